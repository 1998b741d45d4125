"""appo's verl plugin: the module verl itself imports, in every process it starts, when a run sets

    VERL_USE_EXTERNAL_MODULES=appo.integrations.verl_plugin

(verl 0.9.1 imports the named modules at the end of ``import verl``). Importing it registers, through verl's
registries only, the advantage estimator and policy loss "appo" (``appo.integrations.verl.register``; APPO's
settings are verl config keys, ``actor_rollout_ref.actor.policy_loss.appo``), the agent loop "appo_agent" (``appo.integrations.verl_agent``: appo's tool loop
on verl's LLM servers, for the rollouts and their branches) and the trainer mode "appo"
(``appo.integrations.verl_trainer``). The agent loop and the trainer mode need more of verl (its agent-loop
module; the v1 trainer's transfer_queue, ...); in a process without them (e.g. a worker of a lighter install)
only what imports is registered, and a warning names what is missing.
"""

import logging

from appo.integrations import verl as _appo_verl

_appo_verl.register()

try:
    from appo.integrations import verl_agent as _verl_agent  # noqa: F401  (agent loop "appo_agent")
except ImportError as error:
    logging.getLogger(__name__).warning("appo: verl agent loop 'appo_agent' not registered in this process "
                                        "(%s)", error)
try:
    from appo.integrations import verl_trainer as _verl_trainer  # noqa: F401  (register_trainer("appo"))
except ImportError as error:
    logging.getLogger(__name__).warning("appo: verl trainer_mode 'appo' not registered in this process (%s); "
                                        "the 'appo' estimator and policy loss are", error)
