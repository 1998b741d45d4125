"""appo's verl plugin: the module verl itself imports, in every process it starts, when a run sets

    VERL_USE_EXTERNAL_MODULES=appo.integrations.verl_plugin

(verl 0.9.1 imports the named modules at the end of ``import verl``). Importing it registers, through verl's
registries only, the advantage estimator and policy loss "appo" (``appo.integrations.verl.register``: settings
from ``$APPO_VERL_SETTINGS``) and the trainer mode "appo" (``appo.integrations.verl_trainer``). The trainer mode
needs verl's v1 trainer dependencies (transfer_queue, ...); in a process without them (e.g. a worker of a
lighter install) only the estimator and the loss are registered, and a warning says why.
"""

import logging

from appo.integrations import verl as _appo_verl

_appo_verl.register()

try:
    from appo.integrations import verl_trainer as _verl_trainer  # noqa: F401  (register_trainer("appo"))
except ImportError as error:
    logging.getLogger(__name__).warning("appo: verl trainer_mode 'appo' not registered in this process (%s); "
                                        "the 'appo' estimator and policy loss are", error)
