"""What ``cloud-hub federate`` is asked to do (:class:`FederateConfig`), and the one error it tells the operator.

The command line (:mod:`cloud_hub.cli.rounds`), the federated demo and the benches build a
:class:`FederateConfig`; the coordinator (:mod:`cloud_hub.rounds.coordinator`) and the opening of each round
(:mod:`cloud_hub.rounds.opening`) read it. :class:`RoundError` is an operator's problem (no model, no devices,
no signing key, options that cannot go together), said in one line with its exit code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cloud_hub.errors import HubError
from edge_agent import exits


class RoundError(HubError, RuntimeError):
    """No model to federate, no devices to ask, no signing key: an operator's problem, said in one line."""

    exit_code = exits.MODEL


@dataclass(frozen=True)
class FederateConfig:
    rounds: int = 5
    fraction: float = 1.0  # share of the available devices asked each round
    min_available: int = 1  # wait (up to wait_devices_s) until this many devices run the base version
    wait_devices_s: float = 60.0
    min_updates: int | None = None  # K: close once this many updates counted (default: every participant)
    deadline_s: float = 60.0
    # Local training (SGD, momentum 0.9): chosen by bench/federated_watch.py --study on s01-s08 only
    epochs: int = 5
    lr: float = 0.03
    batch: int = 64
    mu: float = 0.0
    clip: float = 10.0
    refuse_factor: float = 3.0  # an update whose norm is over refuse_factor x clip is refused, not clipped
    train_layers: int | None = None  # the last k layers; None = all
    min_windows: int = 32  # a device answers when it holds this many labelled windows...
    min_new: int = 0  # ...with this many new since it last answered
    max_staleness: int = 1
    encoding: str = "int8"
    budget_s: float = 60.0
    tolerance: float = 0.0  # the gate: the candidate may be this much worse on the hold-out
    holdout_logs: tuple[str, ...] = ()
    aggregate: str = "fedavg"  # or a robust rule (fedavg.RULES): how the hub combines the round's updates
    secure: bool = False  # secure aggregation: the hub learns only the sum of the devices' deltas
    threshold: int | None = None  # secure: devices that must reveal their shares (default: a majority)
    # differential privacy (cloud_hub/rounds/privacy.py): distributed noise with secure, central without
    dp_noise: float | None = None  # the noise multiplier; None with a target_epsilon: calibrated to it
    target_epsilon: float | None = None  # the model's budget: no round opens that would spend past it
    dp_delta: float = 1e-5
    # the announcement's weights (train and evaluate rounds): float16 halves the bytes down (the devices train
    # from the rounded base, and their deltas are against it: bench/federated_watch.py --fp16, docs)
    weights_dtype: str = "float16"
    seed: int = 0

    @property
    def dp(self) -> bool:
        return self.dp_noise is not None or self.target_epsilon is not None


__all__: Sequence[str] = ("FederateConfig", "RoundError")
