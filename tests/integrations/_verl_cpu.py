"""CPU stand-ins for the GPU parts of a verl 0.9.1 run, and the checks that run APPO's verl trainer mode and
agent loop on them. Imported by test_verl.py inside the verl venv (never by pytest in appo's own environment).

verl's own code, unchanged: ``PPOTrainer.step`` / ``_step_once`` (replay buffer, ``AgentLoopManagerTQ``,
balancing, the old-log-prob pass), ``CheckpointEngineManager`` (the sync trainer's "naive" backend),
``AgentLoopManager`` / ``AgentLoopWorker``, ``LLMServerClient`` and its router, ``RewardLoopManager`` /
``RewardLoopWorker`` with a custom reward function file, ``RLHFDataset`` on parquet files, TransferQueue,
``RayWorkerGroup`` with verl's dispatch, and the "appo" policy loss from verl's registry.
Stand-ins for what needs a GPU:
* ``CPUActor``: verl's actor worker interface (``compute_log_prob`` / ``update_actor`` on TransferQueue rows,
  ``update_weights`` to the rollout server) with a tiny llama on 2 gloo ranks; log-probs from one forward per
  row (numerics that do not depend on the batch), gradients all-reduced, SGD.
* ``CPUServer``: verl's rollout server interface (``generate`` with stop strings and log-probs, ``wake_up`` /
  ``sleep``, weights loaded by the actor's ``update_weights``); it refuses to generate while asleep and
  records the fingerprint (float64 sum of the parameters) of the weights each request was sampled with.
* ``ScriptServer``: a server that answers each request with the next text of a script, to drive tool calls.
A byte-level tokenizer (every byte a token, a chat template) keeps the model tiny and the text exact.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

MODEL_SEED = 3
REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------- files
def write_model(path: str) -> None:
    """A byte-level tokenizer and a tiny random llama in ``path`` (what verl loads by ``model.path``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from appo.models import tiny_model

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    tokenizer.save_pretrained(path)
    model = tiny_model("llama", vocab_size=len(vocab), hidden_size=32, layers=2, heads=4, kv_heads=2,
                       seed=MODEL_SEED)
    model.config.eos_token_id, model.config.pad_token_id = 2, 0
    model.save_pretrained(path)


TOY_REWARD = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    """A toy reward of the whole response text (varies between rollouts of a random model)."""
    return (sum(map(ord, solution_str)) % 97) / 96
'''

def write_files(root: str, *, reward: str, tools: list[str], stop_tags: list[str], max_tool_calls: int = 2,
                prompts: int = 4) -> dict:
    """Model, reward function, agent-loop config and parquet data under ``root``; returns their paths."""
    import pandas as pd

    paths = {name: os.path.join(root, name) for name in ("model", "reward.py", "loops.yaml", "train.parquet",
                                                        "val.parquet")}
    write_model(paths["model"])
    with open(paths["reward.py"], "w") as handle:
        handle.write(reward)
    with open(paths["loops.yaml"], "w") as handle:
        handle.write(f"- name: appo_agent\n  _target_: appo.integrations.verl_agent.APPOAgentLoop\n"
                     f"  appo_tools: {tools}\n  stop_tags: {stop_tags}\n  max_tool_calls: {max_tool_calls}\n"
                     f"{LOOP_SETTINGS}")
    rows = [{"data_source": "toy", "prompt": [{"role": "user", "content": f"{i + 2}*{i + 3}?"}],
             "reward_model": {"ground_truth": str((i + 2) * (i + 3))}, "extra_info": {"index": i}}
            for i in range(prompts)]
    pd.DataFrame(rows).to_parquet(paths["train.parquet"])
    pd.DataFrame(rows).to_parquet(paths["val.parquet"])
    return paths


# The agent loop's settings these checks were written with (where they differ from RolloutConfig's defaults).
LOOP_SETTINGS = ("  max_new_tokens_per_turn: 256\n  response_prefix: ''\n"
                 "  result_template: \"<result>\\n{result}\\n</result>\\n\"\n")
BRANCHES = 2   # APPO's B, set in verl's config tree (actor_rollout_ref.actor.policy_loss.appo)


def compose_config(paths: dict, overrides: list[str]):
    """verl's own ppo_trainer config (hydra compose), set up for APPO on the CPU stand-ins; APPO's settings
    block in verl's tree: the policy loss's ``appo`` (``appo.integrations.verl_config``), B = BRANCHES."""
    import verl
    from hydra import compose, initialize_config_dir

    base = [
        "trainer.use_v1=True", "trainer.v1.trainer_mode=appo", "algorithm.adv_estimator=appo",
        "actor_rollout_ref.actor.policy_loss.loss_mode=appo",
        "actor_rollout_ref.actor.policy_loss._target_=appo.integrations.verl_config.APPOPolicyLossConfig",
        f"+actor_rollout_ref.actor.policy_loss.appo.branches_per_rollout={BRANCHES}",
        "actor_rollout_ref.actor.clip_ratio_low=0.2",
        "actor_rollout_ref.actor.clip_ratio_high=0.28", "actor_rollout_ref.rollout.name=vllm",
        f"actor_rollout_ref.model.path={paths['model']}", "actor_rollout_ref.rollout.n=2",
        "actor_rollout_ref.rollout.prompt_length=32", "actor_rollout_ref.rollout.response_length=24",
        "actor_rollout_ref.rollout.calculate_log_probs=True", "actor_rollout_ref.rollout.agent.num_workers=1",
        "actor_rollout_ref.rollout.agent.default_agent_loop=appo_agent",
        f"actor_rollout_ref.rollout.agent.agent_loop_config_path={paths['loops.yaml']}",
        "reward.num_workers=1", f"reward.custom_reward_function.path={paths['reward.py']}",
        f"data.train_files={paths['train.parquet']}", f"data.val_files={paths['val.parquet']}",
        "data.train_batch_size=4", "data.max_prompt_length=32", "data.max_response_length=24",
        "data.dataloader_num_workers=0", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2", "actor_rollout_ref.actor.use_kl_loss=False",
        "trainer.total_training_steps=2", "trainer.n_gpus_per_node=2", "trainer.logger=[console]",
        "actor_rollout_ref.actor.fsdp_config.dtype=float32",    # CPUActor's forwards are fp32
    ]
    directory = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=directory, version_base=None):
        return compose(config_name="ppo_trainer", overrides=base + overrides)


# ------------------------------------------------------------------------------------- stand-ins
def fingerprint(model) -> float:
    """float64 sum of every parameter: equal for equal weights, different after any update."""
    import torch

    with torch.no_grad():
        return float(sum(p.double().sum() for p in model.parameters()))


def server_class():
    """``CPUServer`` (module docstring), defined here so that Ray ships it by value."""
    import ray

    @ray.remote
    class CPUServer:
        def __init__(self, model_dir: str, seed: int):
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            self.generator = torch.Generator().manual_seed(seed)
            self.awake, self.weights, self.requests, self.events = False, None, [], []

        def load_weights(self, state: dict, weights: float) -> None:
            self.model.load_state_dict(state)
            self.weights = weights
            self.events.append(("load", weights))

        async def wake_up(self):
            self.awake = True
            self.events.append(("wake", self.weights))

        async def sleep(self):
            self.awake = False
            self.events.append(("sleep", self.weights))

        async def generate(self, prompt_ids, sampling_params, request_id, image_data=None, video_data=None,
                           **unused):
            import torch
            from verl.workers.rollout.replica import TokenOutput

            if not self.awake:
                raise RuntimeError("CPUServer: generate while asleep (the trainer must wake the replicas)")
            temperature = float(sampling_params.get("temperature", 1.0)) or 1.0
            budget = int(sampling_params.get("max_tokens", 16))
            stops = list(sampling_params.get("stop") or [])
            tokens, logprobs = list(prompt_ids), []
            with torch.no_grad():
                for _ in range(budget):
                    logits = self.model(torch.tensor([tokens])).logits[0, -1].float() / temperature
                    logp = torch.log_softmax(logits, dim=-1)
                    token = int(torch.multinomial(logp.exp(), 1, generator=self.generator))
                    tokens.append(token)
                    logprobs.append(float(logp[token]))
                    text = self.tokenizer.decode(tokens[len(prompt_ids):])
                    if token == self.tokenizer.eos_token_id or any(s in text for s in stops):
                        break
            new = tokens[len(prompt_ids):]
            self.requests.append({"prompt": list(prompt_ids), "tokens": new, "weights": self.weights})
            return TokenOutput(token_ids=new, log_probs=logprobs if sampling_params.get("logprobs") else None,
                               stop_reason="completed")

        def history(self):
            return {"requests": self.requests, "events": self.events}

    return CPUServer


def script_server_class():
    """``ScriptServer`` (module docstring): replies per case, the case named in the prompt as ``[case]``."""
    import ray

    @ray.remote
    class ScriptServer:
        def __init__(self, model_dir: str, scripts: dict[str, list[str]]):
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            self.scripts, self.prompts = scripts, {name: [] for name in scripts}

        async def generate(self, prompt_ids, sampling_params, request_id, image_data=None, video_data=None,
                           **unused):
            from verl.workers.rollout.replica import TokenOutput

            text = self.tokenizer.decode(prompt_ids)
            case = next(name for name in self.scripts if f"[{name}]" in text)
            self.prompts[case].append(text)
            script = self.scripts[case]
            reply = script[min(len(self.prompts[case]), len(script)) - 1]
            ids = self.tokenizer.encode(reply, add_special_tokens=False)[:int(sampling_params["max_tokens"])]
            return TokenOutput(token_ids=ids, log_probs=[-1.0] * len(ids), stop_reason="completed")

        def history(self):
            return self.prompts

    return ScriptServer


def _pad_rows(values: list):
    """[R, longest] from R 1-D tensors, zero-padded on the right (keeps autograd)."""
    import torch

    width = max(len(v) for v in values)
    return torch.stack([torch.nn.functional.pad(v, (0, width - len(v))) for v in values])


class Replica:
    """What ``CheckpointEngineManager`` holds per rollout replica: wake_up / sleep of its servers."""

    def __init__(self, server):
        self.server = server

    async def wake_up(self):
        await self.server.wake_up.remote()

    async def sleep(self):
        await self.server.sleep.remote()


def actor_class():
    """``CPUActor`` (module docstring): a verl ``Worker`` with verl's dispatch modes for the actor mesh."""
    import torch
    from verl.single_controller.base import Worker
    from verl.single_controller.base.decorator import (
        Dispatch,
        make_nd_compute_dataproto_dispatch_fn,
        register,
    )

    class CPUActor(Worker):
        @register(dispatch_mode=Dispatch.ONE_TO_ALL)
        def init_model(self, model_dir: str, server_name: str, lr: float, actor_config):
            """actor_config: the tree's ``actor_rollout_ref.actor``, built into verl's actor config as verl's
            actor workers build it (``omega_conf_to_dataclass``: APPO's policy-loss block included)."""
            import torch.distributed as dist
            from transformers import AutoModelForCausalLM
            from verl.utils.config import omega_conf_to_dataclass as build_dataclass

            dist.init_process_group("gloo")
            # not self.config: cloudpickle would take the attribute name for a submodule (a *.config module,
            # unpicklable) and fail to ship this class to the Ray workers
            self.actor_settings = build_dataclass(actor_config)
            self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr)
            self.server_name = server_name
            self._register_dispatch_collect_info("actor", dp_rank=self.rank, is_collect=True)
            self.events = [("init", fingerprint(self.model))]
            return self.rank

        @register(dispatch_mode=Dispatch.ONE_TO_ALL)
        def set_lr(self, lr: float):
            for group in self.optimizer.param_groups:
                group["lr"] = lr

        @register(dispatch_mode=Dispatch.ONE_TO_ALL)
        def history(self):
            return self.events

        def _stats(self, data, grad: bool):
            """Per row: log-probs and entropies of every next token (verl's layout: position t predicts token
            t + 1, the last position 0), one forward per row."""
            from verl.utils import tensordict_utils as tu

            temperature = float(tu.get(data, "temperature", 1.0) or 1.0)
            logps, entropies = [], []
            with torch.set_grad_enabled(grad):
                for ids in data["input_ids"].unbind():
                    logits = self.model(ids[None]).logits[0].float() / temperature
                    logp = torch.log_softmax(logits, dim=-1)
                    taken = logp[:-1].gather(-1, ids[1:, None])[:, 0]
                    entropy = -(logp.exp() * logp).sum(-1)[:-1]
                    logps.append(torch.cat([taken, taken.new_zeros(1)]))
                    entropies.append(torch.cat([entropy, entropy.new_zeros(1)]))
            return logps, entropies

        @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
        def compute_log_prob(self, data):
            from tensordict import TensorDict

            logps, entropies = self._stats(data, grad=False)
            self.events.append(("log_prob", fingerprint(self.model)))
            nested = {"log_probs": torch.nested.as_nested_tensor(logps, layout=torch.jagged),
                      "entropy": torch.nested.as_nested_tensor(entropies, layout=torch.jagged)}
            return TensorDict(nested, batch_size=[len(logps)])

        @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
        def update_actor(self, data):
            import torch.distributed as dist
            from verl.trainer.ppo.core_algos import get_policy_loss_fn
            from verl.utils import tensordict_utils as tu

            config = self.actor_settings            # the "appo" loss reads policy_loss.appo from it
            loss_fn = get_policy_loss_fn(config.policy_loss.loss_mode)
            before = fingerprint(self.model)
            losses = []
            for _ in range(int(tu.get(data, "epochs", 1))):
                logps, _ = self._stats(data, grad=True)
                rows = list(zip(logps, data["responses"].unbind(), data["response_mask"].unbind(),
                                data["old_log_probs"].unbind(), data["advantages"].unbind()))
                current = _pad_rows([lp[len(lp) - len(resp) - 1:-1] for lp, resp, *_ in rows])
                loss, _ = loss_fn(_pad_rows([r[3] for r in rows]), current, _pad_rows([r[4] for r in rows]),
                                  _pad_rows([r[2] for r in rows]), "token-mean", config)
                self.optimizer.zero_grad()
                loss.backward()
                for p in self.model.parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= dist.get_world_size()
                self.optimizer.step()
                losses.append(float(loss))
            self.events.append(("update", before, fingerprint(self.model), len(rows)))
            return tu.get_tensordict(tensor_dict={}, non_tensor_dict={"metrics": {"mfu": 0.0,
                                                                                  "pg_loss": losses}})

        @register(dispatch_mode=Dispatch.ONE_TO_ALL, blocking=False)
        def update_weights(self, global_steps: int | None = None, mode: str = "auto"):
            import ray

            weights = fingerprint(self.model)
            self.events.append(("sync", weights))
            if self.rank == 0:                                   # the naive backend: weights, then wake
                server = ray.get_actor(self.server_name)
                state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                ray.get(server.load_weights.remote(state, weights))
                ray.get(server.wake_up.remote())
            return {}

    return CPUActor


# ------------------------------------------------------------------------------------------- runs
def _world(config, paths: dict, *, lr: float, server_name: str, seed: int = 0):
    """The CPU stand-ins wired the way verl's ``PPOTrainer._setup`` wires the real ones; returns
    (actor worker group, server, LLM client factory, reward loop manager)."""
    from types import SimpleNamespace

    import ray
    from verl.experimental.reward_loop.reward_loop import RewardLoopManager
    from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup
    from verl.workers.rollout.llm_server import LLMServerClient
    from verl.workers.rollout.router import get_router_handle

    server = server_class().options(name=server_name).remote(paths["model"], seed)
    pool = RayResourcePool(process_on_nodes=[2], use_gpu=False, max_colocate_count=1)
    actor = RayWorkerGroup(resource_pool=pool, device_name="cpu",
                           ray_cls_with_init=RayClassWithInitArgs(cls=ray.remote(actor_class())))
    actor.init_model(paths["model"], server_name, lr, config.actor_rollout_ref.actor)
    router = get_router_handle(servers={"cpu-server:0": server})
    llm = SimpleNamespace(get_client=lambda: LLMServerClient(config=config, load_balancer_handle=router))
    return actor, server, llm, RewardLoopManager(config)


def run_trainer(root: str, *, steps_lr: tuple[float, ...] = (0.0, 0.5), model_dir: str | None = None) -> dict:
    """verl's ``PPOTrainer.step`` with ``APPOTrainer`` on the CPU stand-ins: one step per learning rate in
    ``steps_lr`` (4 prompts x N = 2, B = 2, two parts of 2 prompts, 2 actor ranks). Returns per step verl's
    metrics and timings, the branch requests per part (parent prompt uids), the actor's and the server's
    weight fingerprints, and the TransferQueue advantages."""
    import numpy as np
    import ray
    import transfer_queue as tq
    from verl.checkpoint_engine.base import CheckpointEngineManager
    from verl.trainer.ppo.v1 import AgentLoopManagerTQ
    from verl.utils.config import omega_conf_to_dataclass

    from appo.integrations.verl_trainer import APPOTrainer, prompt_of

    paths = write_files(root, reward=TOY_REWARD, tools=[], stop_tags=["</answer>"])
    if model_dir is not None:
        paths["model"] = model_dir
    config = compose_config(paths, [])
    tq.init(config.transfer_queue)
    actor, server, llm, rewards = _world(config, paths, lr=steps_lr[0], server_name="appo-cpu-server")

    class RecordingTrainer(APPOTrainer):
        """APPOTrainer as is; its branch generations are recorded (``calls``) for the checks."""

        def _appo_agent_loops(self):
            loops, trainer = super()._appo_agent_loops(), self

            class Recorded:
                def generate_sequences(self, requests):
                    before = len(ray.get(server.history.remote())["requests"])
                    output = loops.generate_sequences(requests)
                    after = len(ray.get(server.history.remote())["requests"])
                    trainer.calls.append({"step": trainer.global_steps, "server_requests": (before, after),
                                          "parents": [str(u) for u in requests.non_tensor_batch["uid"]],
                                          "rewards": output.batch["rm_scores"].sum(-1).tolist()})
                    return output
            return Recorded()

    trainer = RecordingTrainer(config)
    trainer.calls = []
    trainer._init_tokenizer()
    trainer._init_dataloader()
    checkpoint = omega_conf_to_dataclass(config.actor_rollout_ref.rollout.checkpoint_engine)
    checkpoint.backend = "naive"
    trainer.actor_rollout_wg, trainer.reward_loop_manager, trainer.llm_server_manager = actor, rewards, llm
    trainer.checkpoint_manager = CheckpointEngineManager(config=checkpoint, actor_wg=actor,
                                                         replicas=[Replica(server)])
    trainer.teacher_model_manager = trainer.distillation_config = None
    trainer.agent_loop_manager = AgentLoopManagerTQ.create(
        config=config, llm_client=trainer.get_llm_client(), teacher_client=None,
        reward_loop_worker_handles=trainer.get_reward_handles())
    trainer.global_steps, trainer.curr_step_profile = 1, False      # what verl's fit() sets before a step
    trainer.on_init_end()                                   # verl's sync trainer: weights to the replicas
    report = {"steps": []}
    try:
        for lr in steps_lr:
            actor.set_lr(lr)
            metrics, trainer.timing_raw = {}, {}
            started = time.perf_counter()
            batch = trainer.step(metrics, trainer.timing_raw)
            trainer.on_step_end()
            seconds = time.perf_counter() - started
            real = [k for k, t in zip(batch.keys, batch.tags) if not t.get("is_padding", False)]
            got = tq.kv_batch_get(keys=real, partition_id=batch.partition_id,
                                  select_fields=["advantages", "response_mask", "uid"])
            advantages = [a.tolist() for a in got["advantages"].unbind()]
            report["steps"].append({
                "lr": lr, "seconds": seconds, "metrics": {k: float(v) for k, v in metrics.items()
                                                         if isinstance(v, (int, float, np.number))},
                "timing": dict(trainer.timing_raw), "rows_per_prompt": _count([prompt_of(k) for k in real]),
                "advantage_nonzero": sum(any(v != 0 for v in a) for a in advantages)})
            tq.kv_clear(keys=batch.keys, partition_id=batch.partition_id)
            trainer.global_steps += 1
        report["calls"] = trainer.calls
        report["actor_events"] = actor.history()[0]
        report["server"] = ray.get(server.history.remote())
    finally:
        branch_loops = trainer._appo_branch_loop
        _kill([server, *actor.workers, *rewards.reward_loop_workers,
               *trainer.agent_loop_manager.agent_loop_workers,
               *(branch_loops.agent_loop_workers if branch_loops is not None else [])])
        tq.close()
    return report


def _kill(actors) -> None:
    """End the run's Ray actors (verl names some of them: a later run would collide)."""
    import ray

    for handle in actors:
        ray.kill(handle)


def _count(values) -> dict:
    out: dict = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


AGENT_LOOPS = f"""- name: appo_agent
  _target_: appo.integrations.verl_agent.APPOAgentLoop
  appo_tools: [calculator]
  stop_tags: ['</calculator>', '</answer>']
  max_tool_calls: 2
{LOOP_SETTINGS}- name: appo_agent_one_call
  _target_: appo.integrations.verl_agent.APPOAgentLoop
  appo_tools: [calculator]
  stop_tags: ['</calculator>', '</answer>']
  max_tool_calls: 1
{LOOP_SETTINGS}"""
FAKE = "<result>\n1\n</result>\n<answer>1</answer>"


def run_agent_loop(root: str) -> dict:
    """verl's ``AgentLoopManager`` with ``appo_agent`` (calculator tool) on a ``ScriptServer``, rewarded by
    verl's reward loop workers with appo's verl reward function (scripts/verl_appo_reward.py: the arithmetic
    reward of ``appo_graded_text``, 1.0 for the right answer, 0.0 for a wrong one, -0.1 malformed). One
    request per case, each with the server's replies in turn order:
      initial (gold "1"): the model closes a call and, in the same reply, writes a fake result and answer "1";
      branch (gold "1"): a branch whose prefix holds a completed call (its result, mask 0) and the open call
        "<calculator>6*" (mask 1) continues with "7</calculator>" plus the same fake result and answer;
      limit (gold "1"): that branch through a loop allowing one call: the prefix's call used it up;
      credit (gold "42"): the model calls the tool, then answers with the tool's result (the control: the
        reward does give credit)."""
    import numpy as np
    import ray
    from transformers import AutoTokenizer
    from verl import DataProto
    from verl.experimental.agent_loop import AgentLoopManager
    from verl.experimental.reward_loop.reward_loop import RewardLoopManager
    from verl.workers.rollout.llm_server import LLMServerClient
    from verl.workers.rollout.router import get_router_handle

    paths = write_files(root, reward=TOY_REWARD, tools=["calculator"],
                        stop_tags=["</calculator>", "</answer>"])
    paths["reward.py"] = str(REPO / "scripts" / "verl_appo_reward.py")   # appo's own verl reward function
    with open(paths["loops.yaml"], "w") as handle:
        handle.write(AGENT_LOOPS)
    config = compose_config(paths, ["actor_rollout_ref.rollout.response_length=160",
                                    "actor_rollout_ref.rollout.prompt_length=160"])
    tokenizer = AutoTokenizer.from_pretrained(paths["model"])

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    def chat(case: str) -> list[dict]:
        return [{"role": "user", "content": f"[{case}] What is 6*7?"}]

    earlier, result, open_call = encode("<calculator>1+1</calculator>"), encode("<result>\n2\n</result>\n"), \
        encode("<calculator>6*")
    prefix = {"response_ids": earlier + result + open_call, "include_token": False,
              "response_mask": [1] * len(earlier) + [0] * len(result) + [1] * len(open_call)}
    cases = {   # name: (server replies, agent loop, ground truth, branch prefix)
        "initial": (["Let me <calculator>6*7</calculator>" + FAKE, "<answer>7</answer>"], "appo_agent", "1",
                    None),
        "branch": (["7</calculator>" + FAKE, "<answer>7</answer>"], "appo_agent", "1", prefix),
        "limit": (["7</calculator>" + FAKE, "<answer>7</answer>"], "appo_agent_one_call", "1", prefix),
        "credit": (["<calculator>6*7</calculator>", "<answer>42</answer>"], "appo_agent", "42", None),
    }
    server = script_server_class().remote(paths["model"], {name: case[0] for name, case in cases.items()})
    client = LLMServerClient(config=config,
                             load_balancer_handle=get_router_handle(servers={"script:0": server}))
    rewards = RewardLoopManager(config)
    loops = AgentLoopManager.create(config=config, llm_client=client,
                                    reward_loop_worker_handles=rewards.reward_loop_worker_handles)
    names = ("raw_prompt", "data_source", "reward_model", "agent_name", "uid", "appo_branch")
    columns = {key: np.empty(len(cases), dtype=object) for key in names}
    for i, (name, (_, agent, truth, branch)) in enumerate(cases.items()):
        prompt_ids = encode(tokenizer.apply_chat_template(chat(name), add_generation_prompt=True,
                                                          tokenize=False))
        values = {"raw_prompt": chat(name), "data_source": "toy", "reward_model": {"ground_truth": truth},
                  "agent_name": agent, "uid": name,
                  "appo_branch": None if branch is None else {**branch, "prompt_ids": prompt_ids}}
        for key, value in values.items():
            columns[key][i] = value
    if all(value is None for value in columns["appo_branch"]):
        del columns["appo_branch"]
    try:
        output = loops.generate_sequences(DataProto(batch=None, non_tensor_batch=columns,
                                                    meta_info={"global_steps": 1}))
        served = ray.get(server.history.remote())
    finally:
        _kill([server, *rewards.reward_loop_workers, *loops.agent_loop_workers])
    width = output.batch["prompts"].shape[1]
    report = {}
    for i, (name, (_, _, _, branch)) in enumerate(cases.items()):
        valid = output.batch["attention_mask"][i, width:].bool()
        response = output.batch["responses"][i][valid].tolist()
        mask = output.batch["response_mask"][i][valid].tolist()
        kept = branch is None or (response[:len(branch["response_ids"])] == branch["response_ids"]
                                  and mask[:len(branch["response_mask"])] == branch["response_mask"])
        report[name] = {
            "text": tokenizer.decode(response), "prefix_kept": kept,
            "model_text": tokenizer.decode([t for t, m in zip(response, mask) if m]),
            "tool_text": tokenizer.decode([t for t, m in zip(response, mask) if not m]),
            "reward": float(output.batch["rm_scores"][i].sum()),
            "finish": output.non_tensor_batch["appo_finish"][i],
            "calls": output.non_tensor_batch["appo_tool_calls"][i], "server_turns": len(served[name]),
            "graded_text": output.non_tensor_batch["appo_graded_text"][i],
            "agent": output.non_tensor_batch["appo_agent"][i]}
    return report


def main() -> None:
    """``python _verl_cpu.py cost [--model smollm2-135m-instruct|PATH] [--steps K]``: K APPOTrainer steps on
    the CPU stand-ins (lr 1e-6) and, per step, the seconds of the step and of its phases (verl's ``timing_s``
    names: ``gen``, ``old_log_prob``, ``update_actor``, ``update_weights``; APPO's ``appo_sync``,
    ``appo_logprob``, ``appo_branch_generate``) as one JSON line. Run it in the verl venv with
    VERL_USE_EXTERNAL_MODULES=appo.integrations.verl_plugin (scripts/verl_branch_cost.sh does)."""
    import argparse
    import json
    import tempfile

    import ray

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("what", choices=["cost"])
    parser.add_argument("--model", default=None, help="a model directory or 'smollm2-135m-instruct' "
                                                      "(default: the tiny test model)")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    model_dir = None
    if args.model is not None:
        from appo.models import model_path

        model_dir = str(model_path(args.model))
    ray.init(num_cpus=32, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as root:
            report = run_trainer(root, steps_lr=(1e-6,) * args.steps, model_dir=model_dir)
    finally:
        ray.shutdown()
    keys = ("gen", "old_log_prob", "appo_logprob", "appo_sync", "appo_branch_generate", "update_actor",
            "update_weights")
    steps = [{"seconds": round(s["seconds"], 3), **{k: round(s["timing"].get(k, 0.0), 3) for k in keys},
              "rows": sum(s["rows_per_prompt"].values()), "branches": s["metrics"].get("appo/branches")}
             for s in report["steps"]]
    print(json.dumps({"model": args.model or "tiny", "steps": steps}))


if __name__ == "__main__":
    main()
