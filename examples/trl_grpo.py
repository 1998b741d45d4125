"""Plain TRL GRPO on the arithmetic task with SmolLM2-135M-Instruct, on CPU: the baseline that
examples/trl_appo.py runs with only the trainer and config classes swapped and an APPO config block added
(it calls ``train`` below; `diff` the two files).

    python examples/trl_grpo.py --max-steps 1
"""

import argparse
import re

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from appo.models import load_model
from appo.tasks import Arithmetic, Example

INSTRUCTION = " Think briefly, then give only the number inside <answer></answer>."


def arithmetic_dataset(size: int) -> Dataset:
    """Conversational prompts with their gold answers (TRL passes extra columns to the reward functions)."""
    examples = Arithmetic(num_train=size, num_dev=8, max_operands=2, max_operand=20).examples("train")
    return Dataset.from_dict({
        "prompt": [[{"role": "user", "content": e.question + INSTRUCTION}] for e in examples],
        "answer": [e.answer for e in examples],
        "question": [e.question for e in examples],
    })


TASK = Arithmetic()


def arithmetic_reward(completions, answer, question, **kwargs):
    """appo's task reward (correct answer + format rule) of each completion."""
    return [TASK.reward(completion[0]["content"], Example(id="", question=q, answer=a)).score
            for completion, a, q in zip(completions, answer, question)]


def number_mentioned_reward(completions, answer, **kwargs):
    """Partial credit while the small model has not learnt the <answer> format: the gold number appears."""
    return [0.5 * float(a in re.findall(r"-?\d+", completion[0]["content"]))
            for completion, a in zip(completions, answer)]


def train(config_class=GRPOConfig, trainer_class=GRPOTrainer, description=__doc__, **config_block):
    """Parse --max-steps / --output-dir, train ``trainer_class`` on the arithmetic dataset with both rewards
    and print the log. examples/trl_appo.py calls it with APPO's classes and its config block."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=1)
    parser.add_argument("--output-dir", default="runs/trl_example")
    options = parser.parse_args()
    model, tokenizer = load_model()
    tokenizer.padding_side = "left"
    config = config_class(
        output_dir=options.output_dir, max_steps=options.max_steps, per_device_train_batch_size=4,
        num_generations=4, max_completion_length=32, learning_rate=1e-6, logging_steps=1, report_to="none",
        save_strategy="no", use_cpu=True, bf16=False, seed=0, **config_block,
    )
    trainer = trainer_class(model=model, reward_funcs=[arithmetic_reward, number_mentioned_reward], args=config,
                            train_dataset=arithmetic_dataset(64), processing_class=tokenizer)
    trainer.train()
    for entry in trainer.state.log_history:
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in entry.items()})


if __name__ == "__main__":
    train()
