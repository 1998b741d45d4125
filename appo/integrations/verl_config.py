"""APPO's settings block in verl 0.9.1's config tree: ``actor_rollout_ref.actor.policy_loss`` as
:class:`APPOPolicyLossConfig`, verl's ``PolicyLossConfig`` plus ``appo`` (``appo.algos.chain.APPOSettings``:
the fields, defaults and ranges of appo's ``algo.appo`` block, under the same names)::

    actor_rollout_ref.actor.policy_loss._target_=appo.integrations.verl_config.APPOPolicyLossConfig
    actor_rollout_ref.actor.policy_loss.loss_mode=appo
    +actor_rollout_ref.actor.policy_loss.appo.branches_per_rollout=3
    +actor_rollout_ref.actor.policy_loss.appo.combine=sum

verl instantiates the actor config from its tree by ``_target_`` (``omega_conf_to_dataclass``) in the driver,
where ``validate_config`` runs, and in every actor worker, so a bad value fails before training starts, naming
the key, and the "appo" policy loss finds the block in the ``config`` verl passes it. Importing this module
imports verl (``appo.integrations.verl`` does not).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from verl.workers.config import PolicyLossConfig

from appo.integrations.verl import appo_settings


@dataclass
class APPOPolicyLossConfig(PolicyLossConfig):
    """verl's policy-loss config with APPO's settings block ``appo``: a mapping of
    ``appo.algos.chain.APPOSettings`` fields (from the config tree), built into an APPOSettings and checked
    when verl builds the actor config."""

    appo: Any = field(default_factory=dict)

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        object.__setattr__(self, "appo", appo_settings(self.appo))  # verl's configs freeze their fields
