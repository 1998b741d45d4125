"""appo inside other trainers. Each engine lives in its own submodule and is imported explicitly, so
``import appo.integrations`` pulls in neither TRL nor verl:

    from appo.integrations.trl import APPOConfig, APPOTrainer     # needs: pip install 'appo[trl]'
    from appo.integrations import verl as appo_verl              # verl is imported by appo_verl.register()
    appo_verl.register()                                          # adv_estimator="appo", loss_mode="appo"

See docs/integrations.md for what maps to what and the recipes.
"""
