"""The non-policy runs of evaluation, computed once and stored: ``addiffusion eval baselines``.

Every method of :func:`addiffusion.eval.evaluate.evaluate` that is not a learned policy (the
fixed schedules ``<solver>[-ays]-<k>``, best-of-N, the heuristics on the dataset's grid and the
AdaptiveDiffusion baselines) depends only on the dataset, the held-out (prompt, seed) pairs and
the ``eval`` keys of :data:`BASELINE_KEYS`; :func:`addiffusion.eval.evaluate.run_baselines`
computes them (the same code ``evaluate`` runs when it is given none), :func:`save_baselines`
writes them and ``addiffusion eval --baselines <dir>`` reads them back (:func:`load_baselines`)
instead of running them again, so that an ablation of the learned policies (``dvc exp run -S
offline_rl....``) re-runs only the policies.

Layout of the folder (no pickle anywhere):

* ``index.json``: ``format``; ``fingerprint`` (:func:`fingerprint`: what the runs depend on,
  checked by :meth:`BaselineRuns.check` before they are used); ``fixed``: the fixed schedules as
  ``[name, solver label, k]`` (the frontier's points); ``methods``: per method, in run order,
  ``name``, ``kind`` (baseline | heuristic), ``sampler`` (``k-point``: fixed schedules and
  best-of-N on their own k-point grids; ``dataset``: heuristics on the dataset's grid; ``reuse``:
  AdaptiveDiffusion's grid-plus-reuse sampler), ``file``, ``sha256`` of the file, ``components``
  (their order), ``masked_actions`` and ``seconds`` (the run's wall time);
* one ``<i>-<name>.npz`` per method (``np.savez_compressed``; read with ``allow_pickle=False``):
  ``nfe``, ``stop_step``, ``refines`` (int64), ``images`` (uint8, N x H x W x 3) and
  ``component.<name>`` (float64) per raw component of the final images.

The folder is written into a temporary sibling and renamed into place, so a crash never leaves a
half-written one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from addiffusion.config import UserError
from addiffusion.eval.config import EvalConfig
from addiffusion.eval.heldout import EvalItem
from addiffusion.eval.rollout import MethodRun

FORMAT = 1
INDEX = "index.json"
SAMPLERS = ("k-point", "dataset", "reuse")
"""Where a baseline runs: ``k-point`` (its own k-point grid: fixed schedules, best-of-N),
``dataset`` (the dataset's grid and action table: stop heuristics, random stride, progress),
``reuse`` (the dataset's grid plus the 0-NFE reuse action: AdaptiveDiffusion)."""

POLICY_ONLY_KEYS = ("checkpoints", "pairs", "bootstrap_samples", "confidence")
"""``eval`` keys that only the learned-policy part of evaluation reads: which checkpoints are
rolled out, which pairs of learned methods are compared, and the bootstrap of every interval
(computed from the stored per-item runs, never stored). Every other ``eval`` key is in
:data:`BASELINE_KEYS`."""

BASELINE_KEYS = tuple(
    f.name for f in dataclasses.fields(EvalConfig) if f.name not in POLICY_ONLY_KEYS
)
"""``eval`` keys the stored baseline runs depend on (the ``eval_baselines`` stage's params):
which methods run (``baseline_steps``, ``solvers``, ``grids``, ``best_of``, ``best_of_steps``,
``random_stride``, the heuristics' thresholds, ``adaptive_diffusion_*``), on which pairs
(``seeds_per_prompt``, ``n_prompts``, ``seed``) and how (``batch_size`` and ``device`` can change
the floats of batched denoising). A key added to :class:`EvalConfig` later is one of them unless
it is added to :data:`POLICY_ONLY_KEYS`."""


@dataclass(frozen=True)
class BaselineRun:
    """One non-policy method's run on the held-out pairs."""

    name: str
    kind: str  # baseline (a fixed schedule) | heuristic (everything else)
    sampler: str  # one of SAMPLERS
    run: MethodRun


@dataclass(frozen=True)
class BaselineRuns:
    """Every non-policy run of an evaluation, in run order, with what they depend on."""

    runs: list[BaselineRun]
    fixed: list[tuple[str, str, int]]
    """(name, solver label, k) of the fixed schedules (``<solver>[-ays]-<k>``, not best-of-N)."""
    fingerprint: dict[str, Any]
    """:func:`fingerprint` of the settings they were computed with."""
    source: str = "the baseline runs"
    """Where they came from (a folder), for messages."""

    def check(self, current: dict[str, Any]) -> None:
        """Raise :class:`UserError` naming every key where ``current`` (:func:`fingerprint` of
        this evaluation) differs from the runs' own."""
        diffs = fingerprint_diff(self.fingerprint, current)
        if diffs:
            raise UserError(
                f"{self.source} were computed with other settings than this evaluation's: "
                f"{'; '.join(diffs)}. Re-run `addiffusion eval baselines` with these settings "
                "(`dvc repro eval_baselines`), or evaluate without --baselines"
            )


def fingerprint(
    info_sha256: str, cfg: EvalConfig, items: Sequence[EvalItem], prompts: str | None
) -> dict[str, Any]:
    """What the baseline runs depend on, as JSON values:

    * ``eval``: the :data:`BASELINE_KEYS` of ``cfg``;
    * ``device``: the device type ``eval.device`` resolves to here (cpu, cuda);
    * ``info_sha256``: sha256 of the dataset's ``meta/info.json`` (its model, solver, grid,
      action table, components and stats);
    * ``prompts``: the ``--prompts`` source (None: the dataset's held-out prompts);
    * ``items``: ``[prompt_id, seed]`` of every held-out pair, in order, and ``prompts_sha256``:
      sha256 of their (prompt, category) texts (a prompt file edited in place).
    """
    from addiffusion.diffusion.backbone import resolve_device

    texts = json.dumps([[it.prompt, it.category] for it in items], ensure_ascii=False)
    out = {
        "eval": {key: getattr(cfg, key) for key in BASELINE_KEYS},
        "device": resolve_device(cfg.device).type,
        "info_sha256": info_sha256,
        "prompts": prompts,
        "items": [[it.prompt_id, it.seed] for it in items],
        "prompts_sha256": hashlib.sha256(texts.encode()).hexdigest(),
    }
    return json.loads(json.dumps(out))  # as index.json gives it back (tuples as lists)


def fingerprint_diff(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One line per key whose value differs: ``eval.<key> (<stored> there, <current> here)``."""
    diffs = []
    there, here = stored.get("eval", {}), current.get("eval", {})
    for key in dict.fromkeys([*here, *there]):
        if key not in there or key not in here:
            diffs.append(f"eval.{key} ({'missing' if key not in there else 'unknown'} there)")
        elif there[key] != here[key]:
            diffs.append(f"eval.{key} ({there[key]!r} there, {here[key]!r} here)")
    labels = {
        "device": "device",
        "info_sha256": "the dataset's meta/info.json (sha256)",
        "prompts": "--prompts",
        "items": "held-out (prompt id, seed) pairs",
        "prompts_sha256": "held-out prompt texts (sha256)",
    }
    for key, label in labels.items():
        a, b = stored.get(key), current.get(key)
        if a == b:
            continue
        if key == "items":
            diffs.append(f"{label} ({len(a or [])} pairs there, {len(b or [])} here)")
        elif key.endswith("sha256"):
            diffs.append(f"{label} ({str(a)[:12]} there, {str(b)[:12]} here)")
        else:
            diffs.append(f"{label} ({a!r} there, {b!r} here)")
    return diffs


def _file_name(i: int, name: str) -> str:
    return f"{i:03d}-{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}.npz"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_baselines(baselines: BaselineRuns, out_dir: Path) -> None:
    """Write ``baselines`` into ``out_dir`` (the layout of this module's docstring), replacing
    it only once everything is written."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    methods = []
    for i, b in enumerate(baselines.runs):
        if b.sampler not in SAMPLERS:
            raise ValueError(f"baseline {b.name!r}: sampler {b.sampler!r} not one of {SAMPLERS}")
        run = b.run
        file = _file_name(i, b.name)
        np.savez_compressed(
            tmp / file,
            nfe=np.asarray(run.nfe, np.int64),
            stop_step=np.asarray(run.stop_step, np.int64),
            refines=np.asarray(run.refines, np.int64),
            images=np.asarray(run.images, np.uint8),
            **{f"component.{k}": np.asarray(v, np.float64) for k, v in run.components.items()},
        )
        methods.append(
            {
                "name": b.name,
                "kind": b.kind,
                "sampler": b.sampler,
                "file": file,
                "sha256": _sha256(tmp / file),
                "components": list(run.components),
                "masked_actions": int(run.masked_actions),
                "seconds": float(run.seconds),
            }
        )
    index = {
        "format": FORMAT,
        "fingerprint": baselines.fingerprint,
        "fixed": [[name, solver, int(k)] for name, solver, k in baselines.fixed],
        "methods": methods,
    }
    (tmp / INDEX).write_text(json.dumps(index, indent=2, ensure_ascii=False) + "\n")
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def load_baselines(path: Path) -> BaselineRuns:
    """The runs :func:`save_baselines` wrote into ``path``, each file checked against its
    sha256 (a :class:`UserError` names what is missing or altered)."""
    path = Path(path)
    rerun = "re-run `addiffusion eval baselines` (`dvc repro eval_baselines`)"
    index_path = path / INDEX
    if not index_path.is_file():
        raise UserError(
            f"{index_path} not found: --baselines must be a folder `addiffusion eval baselines` "
            f"wrote; {rerun}"
        )
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{index_path} is not valid JSON ({e}); {rerun}") from e
    if index.get("format") != FORMAT:
        raise UserError(
            f"{index_path} has format {index.get('format')!r}, this version reads {FORMAT}; {rerun}"
        )
    runs = []
    for m in index["methods"]:
        file = path / m["file"]
        if not file.is_file():
            raise UserError(f"{file} is missing; {rerun}")
        if _sha256(file) != m["sha256"]:
            raise UserError(f"{file} is not the file {INDEX} records (sha256 differs); {rerun}")
        with np.load(file, allow_pickle=False) as z:
            run = MethodRun(
                nfe=z["nfe"],
                stop_step=z["stop_step"],
                refines=z["refines"],
                components={k: z[f"component.{k}"] for k in m["components"]},
                images=z["images"],
                masked_actions=int(m["masked_actions"]),
                seconds=float(m["seconds"]),
            )
        runs.append(BaselineRun(m["name"], m["kind"], m["sampler"], run))
    return BaselineRuns(
        runs,
        [(str(n), str(s), int(k)) for n, s, k in index["fixed"]],
        index["fingerprint"],
        f"the baseline runs in {path}",
    )
