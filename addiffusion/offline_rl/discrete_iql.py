r"""Discrete Implicit Q-Learning as a d3rlpy algorithm (d3rlpy 2.8 ships IQL for continuous actions
only).

Built from d3rlpy's own parts: discrete Q ensembles (``create_discrete_q_function`` with a mean Q
head), a state-value function, a categorical policy, optimizers made by the config's optim
factories (so ``.d3`` checkpoints hold their state), ``fit``, loggers, evaluators. The config is
registered with ``register_learnable``, so ``d3rlpy.load_learnable("policy.d3")`` rebuilds it once
this module is imported (``import addiffusion`` arranges that for whenever d3rlpy is imported).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from d3rlpy.algos.qlearning.base import QLearningAlgoBase, QLearningAlgoImplBase
from d3rlpy.algos.qlearning.torch.utility import DiscreteQFunctionMixin
from d3rlpy.base import DeviceArg, LearnableConfig, register_learnable
from d3rlpy.constants import ActionSpace
from d3rlpy.dataclass_utils import asdict_as_float
from d3rlpy.models.builders import (
    create_categorical_policy,
    create_discrete_q_function,
    create_value_function,
)
from d3rlpy.models.encoders import EncoderFactory, make_encoder_field
from d3rlpy.models.q_functions import MeanQFunctionFactory
from d3rlpy.models.torch import CategoricalPolicy, DiscreteEnsembleQFunctionForwarder, ValueFunction
from d3rlpy.optimizers.optimizers import OptimizerFactory, OptimizerWrapper, make_optimizer_field
from d3rlpy.torch_utility import Modules, TorchMiniBatch, hard_sync, soft_sync
from d3rlpy.types import Shape, TorchObservation
from torch import nn

__all__ = ["DiscreteIQL", "DiscreteIQLConfig", "DiscreteIQLImpl", "DiscreteIQLModules"]


@dataclasses.dataclass()
class DiscreteIQLConfig(LearnableConfig):
    r"""Config of discrete Implicit Q-Learning (Kostrikov et al., 2021).

    IQL never evaluates Q at actions outside the data. With twin Q networks :math:`Q_{\theta_j}`,
    their Polyak-averaged targets :math:`Q_{\bar\theta_j}`, a state value :math:`V_\psi` and a
    categorical policy :math:`\pi_\phi(a|s) = \mathrm{softmax}(f_\phi(s))_a`:

    .. math::

        L_V(\psi) = \mathbb{E}_{(s,a) \sim D}
            [L_2^\tau(\min_j Q_{\bar\theta_j}(s, a) - V_\psi(s))],
            \quad L_2^\tau(u) = |\tau - \mathbb{1}(u < 0)|\, u^2

        L_Q(\theta_j) = \mathbb{E}_{(s,a,r,s',d) \sim D}
            [(r + \gamma (1 - d) V_\psi(s') - Q_{\theta_j}(s, a))^2]

        L_\pi(\phi) = -\mathbb{E}_{(s,a) \sim D}
            [\min(e^{\beta (\min_j Q_{\bar\theta_j}(s,a) - V_\psi(s))}, w_{\max})
             \log \pi_\phi(a|s)]

    The expectile :math:`\tau \in (0.5, 1)` makes :math:`V` an upper expectile of Q over the data
    actions (an in-sample max); the policy is extracted by advantage-weighted regression. The
    discrete case needs no sampling: all three losses only read Q at the logged action.

    References:
        * `Kostrikov, Nair and Levine, Offline Reinforcement Learning with Implicit Q-Learning.
          ICLR 2022. <https://arxiv.org/abs/2110.06169>`_

    Args:
        actor_learning_rate: Learning rate of the policy.
        critic_learning_rate: Learning rate of the Q functions and V.
        actor_optim_factory: Optimizer factory of the policy.
        critic_optim_factory: Optimizer factory of Q and V (one optimizer for both).
        actor_encoder_factory: Encoder of the policy.
        critic_encoder_factory: Encoder of each Q function.
        value_encoder_factory: Encoder of V.
        batch_size: Mini-batch size.
        gamma: Discount factor.
        tau: Polyak coefficient of the target Q update (``targ <- (1-tau) targ + tau Q``).
        n_critics: Number of Q functions (2 = twin Q; the min is used in the targets).
        expectile: :math:`\tau` of the value loss.
        weight_temp: Inverse temperature :math:`\beta` of the advantage weights.
        max_weight: :math:`w_{\max}`, the clamp of the advantage weights.
    """

    actor_learning_rate: float = 3e-4
    critic_learning_rate: float = 3e-4
    actor_optim_factory: OptimizerFactory = make_optimizer_field()
    critic_optim_factory: OptimizerFactory = make_optimizer_field()
    actor_encoder_factory: EncoderFactory = make_encoder_field()
    critic_encoder_factory: EncoderFactory = make_encoder_field()
    value_encoder_factory: EncoderFactory = make_encoder_field()
    batch_size: int = 256
    gamma: float = 0.99
    tau: float = 0.005
    n_critics: int = 2
    expectile: float = 0.7
    weight_temp: float = 3.0
    max_weight: float = 100.0

    def create(self, device: DeviceArg = False, enable_ddp: bool = False) -> DiscreteIQL:
        return DiscreteIQL(self, device, enable_ddp)

    @staticmethod
    def get_type() -> str:
        return "discrete_iql"


@dataclasses.dataclass(frozen=True)
class DiscreteIQLModules(Modules):
    policy: CategoricalPolicy
    q_funcs: nn.ModuleList
    targ_q_funcs: nn.ModuleList
    value_func: ValueFunction
    actor_optim: OptimizerWrapper
    critic_optim: OptimizerWrapper


@dataclasses.dataclass(frozen=True)
class DiscreteIQLLoss:
    """Per-update metrics (logged by d3rlpy's logger under these names)."""

    critic_loss: torch.Tensor
    q_loss: torch.Tensor
    v_loss: torch.Tensor
    actor_loss: torch.Tensor
    mean_v: torch.Tensor
    mean_weight: torch.Tensor


class DiscreteIQLImpl(DiscreteQFunctionMixin, QLearningAlgoImplBase):
    _modules: DiscreteIQLModules

    def __init__(
        self,
        observation_shape: Shape,
        action_size: int,
        modules: DiscreteIQLModules,
        q_func_forwarder: DiscreteEnsembleQFunctionForwarder,
        targ_q_func_forwarder: DiscreteEnsembleQFunctionForwarder,
        gamma: float,
        tau: float,
        expectile: float,
        weight_temp: float,
        max_weight: float,
        device: str,
    ):
        super().__init__(
            observation_shape=observation_shape,
            action_size=action_size,
            modules=modules,
            device=device,
        )
        self._q_func_forwarder = q_func_forwarder
        self._targ_q_func_forwarder = targ_q_func_forwarder
        self._gamma = gamma
        self._tau = tau
        self._expectile = expectile
        self._weight_temp = weight_temp
        self._max_weight = max_weight
        hard_sync(modules.targ_q_funcs, modules.q_funcs)

    def _target_q_at_data_action(self, batch: TorchMiniBatch) -> torch.Tensor:
        """min_j Q_targ_j(s, a) at the logged action: (B, 1), no gradient."""
        with torch.no_grad():
            q = self._targ_q_func_forwarder.compute_expected_q(batch.observations, "min")
            return q.gather(1, batch.actions.long().view(-1, 1))

    def compute_critic_loss(self, batch: TorchMiniBatch) -> tuple[torch.Tensor, ...]:
        """(L_Q summed over critics, L_V, mean V)."""
        actions = batch.actions.long().view(-1)
        with torch.no_grad():
            v_next = self._modules.value_func(batch.next_observations)  # (B, 1)
            y = batch.rewards + (self._gamma**batch.intervals) * (1.0 - batch.terminals) * v_next
        # (E, B, A): every critic, every action; a plain squared error as in the paper (d3rlpy's
        # discrete `compute_error` uses Huber, whose fixed point is not the mean of the target).
        q_all = self._q_func_forwarder.compute_expected_q(batch.observations, "none")
        q_data = q_all.gather(2, actions.view(1, -1, 1).expand(q_all.shape[0], -1, 1))
        q_loss = ((q_data.squeeze(2) - y.view(1, -1)) ** 2).mean(dim=1).sum()

        q_targ = self._target_q_at_data_action(batch)
        v = self._modules.value_func(batch.observations)
        diff = q_targ - v
        weight = (self._expectile - (diff < 0.0).float()).abs()
        v_loss = (weight * diff**2).mean()
        return q_loss, v_loss, v.detach().mean()

    def compute_actor_loss(self, batch: TorchMiniBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_pi, mean advantage weight)."""
        with torch.no_grad():
            adv = self._target_q_at_data_action(batch) - self._modules.value_func(
                batch.observations
            )
            weight = (self._weight_temp * adv).exp().clamp(max=self._max_weight)  # (B, 1)
        logits = self._modules.policy(batch.observations).logits
        log_probs = F.log_softmax(logits, dim=1).gather(1, batch.actions.long().view(-1, 1))
        return -(weight * log_probs).mean(), weight.mean()

    def inner_update(self, batch: TorchMiniBatch, grad_step: int) -> dict[str, float]:
        # 1. Q and V (one optimizer: V's target is the frozen target Q, Q's target is V(s') under
        #    no_grad, so the two losses do not push on each other).
        self._modules.critic_optim.zero_grad()
        q_loss, v_loss, mean_v = self.compute_critic_loss(batch)
        (q_loss + v_loss).backward()
        self._modules.critic_optim.step()

        # 2. policy extraction with the updated V.
        self._modules.actor_optim.zero_grad()
        actor_loss, mean_weight = self.compute_actor_loss(batch)
        actor_loss.backward()
        self._modules.actor_optim.step()

        # 3. Polyak target update.
        soft_sync(self._modules.targ_q_funcs, self._modules.q_funcs, self._tau)
        return asdict_as_float(
            DiscreteIQLLoss(
                critic_loss=(q_loss + v_loss).detach(),
                q_loss=q_loss.detach(),
                v_loss=v_loss.detach(),
                actor_loss=actor_loss.detach(),
                mean_v=mean_v,
                mean_weight=mean_weight,
            )
        )

    def inner_predict_best_action(self, x: TorchObservation) -> torch.Tensor:
        return self._modules.policy(x).logits.argmax(dim=1)

    def inner_sample_action(self, x: TorchObservation) -> torch.Tensor:
        return self._modules.policy(x).sample()

    def predict_logits(self, x: TorchObservation) -> torch.Tensor:
        """Policy logits for (already scaled) observations: (B, A)."""
        return self._modules.policy(x).logits

    def predict_state_value(self, x: TorchObservation) -> torch.Tensor:
        """V(s) for (already scaled) observations: (B,)."""
        return self._modules.value_func(x).view(-1)

    @property
    def policy(self) -> CategoricalPolicy:  # type: ignore[override]
        return self._modules.policy

    @property
    def policy_optim(self) -> torch.optim.Optimizer:
        return self._modules.actor_optim.optim

    @property
    def q_function(self) -> nn.ModuleList:
        return self._modules.q_funcs

    @property
    def q_function_optim(self) -> torch.optim.Optimizer:
        return self._modules.critic_optim.optim


class DiscreteIQL(QLearningAlgoBase[DiscreteIQLImpl, DiscreteIQLConfig]):
    """Discrete IQL; build it with ``DiscreteIQLConfig(...).create(device=...)``."""

    def inner_create_impl(self, observation_shape: Shape, action_size: int) -> None:
        if self._config.compile_graph:
            # The update is not written for CUDA-graph capture; refuse rather than ignore.
            raise ValueError("DiscreteIQL does not support compile_graph=True")
        policy = create_categorical_policy(
            observation_shape,
            action_size,
            self._config.actor_encoder_factory,
            device=self._device,
            enable_ddp=self._enable_ddp,
        )
        q_funcs, q_func_forwarder = create_discrete_q_function(
            observation_shape,
            action_size,
            self._config.critic_encoder_factory,
            MeanQFunctionFactory(),
            n_ensembles=self._config.n_critics,
            device=self._device,
            enable_ddp=self._enable_ddp,
        )
        targ_q_funcs, targ_q_func_forwarder = create_discrete_q_function(
            observation_shape,
            action_size,
            self._config.critic_encoder_factory,
            MeanQFunctionFactory(),
            n_ensembles=self._config.n_critics,
            device=self._device,
            enable_ddp=self._enable_ddp,
        )
        value_func = create_value_function(
            observation_shape,
            self._config.value_encoder_factory,
            device=self._device,
            enable_ddp=self._enable_ddp,
        )
        actor_optim = self._config.actor_optim_factory.create(
            policy.named_modules(), lr=self._config.actor_learning_rate, compiled=False
        )
        critic_optim = self._config.critic_optim_factory.create(
            list(q_funcs.named_modules()) + list(value_func.named_modules()),
            lr=self._config.critic_learning_rate,
            compiled=False,
        )
        modules = DiscreteIQLModules(
            policy=policy,
            q_funcs=q_funcs,
            targ_q_funcs=targ_q_funcs,
            value_func=value_func,
            actor_optim=actor_optim,
            critic_optim=critic_optim,
        )
        self._impl = DiscreteIQLImpl(
            observation_shape=observation_shape,
            action_size=action_size,
            modules=modules,
            q_func_forwarder=q_func_forwarder,
            targ_q_func_forwarder=targ_q_func_forwarder,
            gamma=self._config.gamma,
            tau=self._config.tau,
            expectile=self._config.expectile,
            weight_temp=self._config.weight_temp,
            max_weight=self._config.max_weight,
            device=self._device,
        )

    def get_action_type(self) -> ActionSpace:
        return ActionSpace.DISCRETE


register_learnable(DiscreteIQLConfig)
