"""APPO inside TRL on the arithmetic task with SmolLM2-135M-Instruct, on CPU.

It is the plain GRPO script examples/trl_grpo.py (its dataset, rewards and training loop, imported) with only
the trainer and config classes swapped and the APPO config block added.

    python examples/trl_appo.py --max-steps 2
    torchrun --nproc_per_node 2 examples/trl_appo.py --max-steps 2     # two DDP ranks (gloo on CPU)

One generation feeds two optimizer steps (APPOConfig's default steps_per_generation): step 1 branches before
any update (appo/entropy_only_fraction 1.0), step 2 against the updated policy (appo/omega_max_shift > 0).
"""

from trl_grpo import train  # this folder is on the import path when a script in it runs

from appo.integrations.trl import APPOConfig, APPOTrainer


def main():
    train(APPOConfig, APPOTrainer, description=__doc__,
          # APPO config block: B branch points per completion, future-aware scale b, dual-group rule.
          appo_branches_per_rollout=2, appo_future_scale=0.5, appo_combine="avg", appo_candidates="strict")


if __name__ == "__main__":
    main()
