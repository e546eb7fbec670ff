"""Export a trained offline policy (IQL, CQL, BC, BCQ) as an ONNX graph that acts with action masks.

d3rlpy's own ``algo.save_policy("policy.onnx")`` fails under our torch (>= 2.9): it hands
``torch.onnx.export`` the ``torch.jit.trace`` of a function, and the default (dynamo) exporter no
longer takes one. Its graph would also be fixed to a batch of 1 and ignore the action mask. So we
export :func:`~addiffusion.offline_rl.policy.scores_module` plus the masked argmax ourselves, with
the TorchScript exporter (``dynamo=False``, which needs only the ``onnx`` package).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from addiffusion.offline_rl.policy import OfflinePolicy, scores_module
from addiffusion.policy.combine import restrict_mask

OPSET = 17
"""ONNX opset of the exported graph (onnxruntime >= 1.14 runs it)."""


class MaskedGreedy(nn.Module):
    """obs (B, D) float32, mask (B, n) bool -> action (B,) int64, scores (B, n) float32.

    ``scores`` are the policy's preferences with illegal actions at -inf; ``action`` is their
    argmax (the first one on ties), as :meth:`OfflinePolicy.act`. ``allowed`` (n,) bool (None:
    every action) is ANDed with each mask row, unless that leaves the row empty
    (:meth:`OfflinePolicy.restrict`). A row with no legal action gives action 0: check masks
    before you call the graph (:meth:`OfflinePolicy.act` raises)."""

    allowed: torch.Tensor | None

    def __init__(self, scores: nn.Module, allowed: torch.Tensor | None = None):
        super().__init__()
        self.scores = scores
        self.register_buffer("allowed", None if allowed is None else allowed.to(torch.bool))

    def forward(self, obs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.allowed is not None:
            mask = restrict_mask(mask, self.allowed)
        scores = self.scores(obs).masked_fill(~mask, float("-inf"))
        return scores.argmax(dim=1), scores


def export_onnx(policy: OfflinePolicy, path: Path) -> Path:
    """Write ``policy`` as an ONNX graph at ``path`` and return ``path``.

    Inputs ``obs`` (B, D) float32 (raw observations: the standardisation is inside the graph) and
    ``mask`` (B, n) bool; outputs ``action`` (B,) int64, the greedy legal action, and ``scores``
    (B, n) float32 (logits for iql / bc, mean Q for cql, BCQ's scores for bcq: see
    :meth:`OfflinePolicy.scores`; -inf where illegal). The manifest's ``allowed_actions`` is
    inside the graph (ANDed with ``mask``), and so is its ``observation_drop`` (those columns are
    ignored). B is dynamic. The model's metadata_props hold ``algo``, ``observation_dim``,
    ``actions`` (the action table as JSON: ``action`` indexes it), ``allowed_actions`` and
    ``observation_drop`` (JSON lists; ``null`` for every action) and ``source_sha256`` (the
    ``.d3`` file's, from its manifest).

    Run it with onnxruntime (``InferenceSession(path).run(None, {"obs": obs, "mask": mask})``) or
    ``onnx.reference.ReferenceEvaluator``. Use this instead of d3rlpy's ``save_policy(".onnx")``,
    which fails under torch >= 2.9 (see the module docstring). Needs the ``onnx`` package.
    """
    try:
        import onnx
    except ImportError as e:
        raise ImportError(
            "export_onnx needs the onnx package (pip install onnx; onnxruntime to run the graph)"
        ) from e
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    allowed = None if policy.allowed.all() else torch.as_tensor(policy.allowed)
    module = MaskedGreedy(scores_module(policy), allowed).eval()
    example = (
        torch.zeros(2, policy.observation_dim),
        torch.ones(2, policy.action_size, dtype=torch.bool),
    )
    batch = {0: "batch"}
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated, but the dynamo one needs onnxscript and buys
        # nothing for an MLP and an argmax.
        warnings.filterwarnings(
            "ignore", message="You are using the legacy TorchScript-based ONNX export"
        )
        torch.onnx.export(
            module,
            example,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["obs", "mask"],
            output_names=["action", "scores"],
            dynamic_axes={"obs": batch, "mask": batch, "action": batch, "scores": batch},
        )
    model = onnx.load(str(path))
    onnx.helper.set_model_props(
        model,
        {
            "algo": policy.algo_name,
            "observation_dim": str(policy.observation_dim),
            "actions": json.dumps(policy.actions.to_dict()),
            "allowed_actions": json.dumps(
                None if policy.allowed_actions is None else list(policy.allowed_actions)
            ),
            "observation_drop": json.dumps(list(policy.observation_drop)),
            "source_sha256": str(policy.manifest["sha256"]),
        },
    )
    model.doc_string = (
        f"addiffusion {policy.algo_name} policy: obs (B, {policy.observation_dim}) float32, "
        f"mask (B, {policy.action_size}) bool -> action (B,) int64, scores (B, "
        f"{policy.action_size}) float32"
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
