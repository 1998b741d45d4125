"""appo inside other trainers. Each engine lives in its own submodule and is imported explicitly, so
``import appo.integrations`` pulls in neither TRL nor verl:

    from appo.integrations.trl import APPOConfig, APPOTrainer     # needs: pip install 'appo[trl]'

    # verl: no import in your code; verl loads appo's plugin itself in every process it starts
    #   VERL_USE_EXTERNAL_MODULES=appo.integrations.verl_plugin python -m verl.trainer.main_ppo \
    #       trainer.v1.trainer_mode=appo algorithm.adv_estimator=appo \
    #       actor_rollout_ref.actor.policy_loss.loss_mode=appo ...

Both call the one APPO chain (``appo.algos.chain``). See docs/integrations.md for what maps to what.
"""
