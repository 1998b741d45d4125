"""Static sm_90 check, no GPU needed: compile every Triton kernel of appo and the CUDA gather for sm_90 and
read the machine code.

For each kernel, at the launch configuration its launcher picks for the target sizes (T = 32,768 tokens,
V = 152,064, H = 3,584, bf16; the future-value scan at B = 64, L = 32,768; the gather with 128-dim bf16
heads), the record holds: registers per thread, spilled bytes (local memory, STL/LDL instructions),
shared memory, whether wgmma (HGMMA), cp.async (LDGSTS) and TMA (UTMALDG/UBLKCP) appear in the SASS, and
the SASS instructions of the steady-state main loop per element each thread handles in one of its
iterations (what an element is, is said per kernel).

Run: ``python bench/sm90_static.py --out bench/results/sm90-static-$(date -u +%Y%m%d).json`` (prints a
table; without --out nothing is written). Needs triton (its nvidia backend ships ptxas, cuobjdump and
nvdisasm) and, for the gather, nvcc; TRITON_INTERPRET must be unset (the interpreter replaces the compiler).
Triton caches compiled kernels in ~/.triton, outside the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_ROWS, TARGET_VOCAB, TARGET_HIDDEN = 32_768, 152_064, 3_584
SCAN_ROWS, SCAN_LENGTH = 64, 32_768


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


# ------------------------------------------------------------------------------------------- compiling
def compile_triton(fn, arguments: dict, constexprs: dict, num_warps: int, num_stages: int = 3):
    """Compile a @triton.jit function for sm_90 as the JIT would specialise it at launch.

    arguments: every non-constexpr argument -> a pointer type ("*bf16"; taken as 16-byte aligned, as torch
    allocations are), a Python int or a float (typed and specialised by Triton's own rule: ints divisible
    by 16 get the divisibility hint, an int equal to 1 becomes a constant). Returns the CompiledKernel.
    """
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    signature, attrs, constants = {}, {}, dict(constexprs)
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = arguments[name]
        if isinstance(value, str):
            signature[name], key = value, "D"
        else:
            signature[name], key = native_specialize_impl(BaseBackend, value, False, True, True)
        if signature[name] == "constexpr":
            constants[name] = key
        elif key == "D":
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def compile_cuda(source: Path, workdir: Path) -> bytes:
    """nvcc -cubin for sm_90 of a torch-free CUDA source (the gather kernel); returns the cubin bytes."""
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    cubin = workdir / (source.stem + ".cubin")
    subprocess.run([nvcc, "-cubin", "-arch=sm_90", "-O3", "-std=c++17", str(source), "-o", str(cubin)],
                   check=True, capture_output=True, text=True)
    return cubin.read_bytes()


# ------------------------------------------------------------------------------------------- reading
@dataclass
class Loop:
    first: int
    last: int
    body: list[str]


def disassemble(cubin: bytes, workdir: Path) -> tuple[str, dict]:
    """(SASS text, resource usage {registers, stack, local, shared}) of a one-kernel cubin."""
    path = workdir / "kernel.cubin"
    path.write_bytes(cubin)
    sass = subprocess.run([_tool("nvdisasm"), "-c", str(path)], check=True, capture_output=True,
                          text=True).stdout
    usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(path)], check=True,
                           capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return sass, {"registers": int(fields["REG"]), "stack_bytes": int(fields["STACK"]),
                  "local_bytes": int(fields["LOCAL"]), "static_shared_bytes": int(fields["SHARED"])}


def instructions(sass: str) -> tuple[list[str], dict[str, int]]:
    """The instruction list and the position of each label (.L_x_N) in it."""
    listing, labels = [], {}
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(listing)
            continue
        match = re.match(r"\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;", line)
        if match:
            listing.append(match.group(1))
    return listing, labels


def opcode(instruction: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0]


def loops(sass: str) -> list[Loop]:
    """Every backward branch (BRA to an earlier label) as a loop [label, branch]."""
    listing, labels = instructions(sass)
    found = []
    for index, instruction in enumerate(listing):
        target = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", instruction)
        if target and labels.get(target.group(1), index + 1) <= index:
            start = labels[target.group(1)]
            found.append(Loop(start, index, listing[start:index + 1]))
    return found


def main_loop(sass: str, markers: tuple[str, ...]) -> Loop | None:
    """The innermost loop holding one of the marker opcodes (its main loads or matmuls), or None."""
    holding = [loop for loop in loops(sass) if any(opcode(i).startswith(markers) for i in loop.body)]
    return min(holding, key=lambda loop: len(loop.body)) if holding else None


def profile(name: str, cubin: bytes, dynamic_shared: int, markers: tuple[str, ...], per_iteration: float,
            element: str, workdir: Path, config: dict, loop: Loop | None = None) -> dict:
    """The record of one compiled kernel (see the module docstring). The main loop is ``loop`` when given,
    else the innermost loop holding a ``markers`` opcode, else (no loop) the whole kernel."""
    sass, usage = disassemble(cubin, workdir)
    listing, _ = instructions(sass)
    ops = [opcode(i) for i in listing]
    loop = loop or main_loop(sass, markers)
    body = loop.body if loop else listing
    counts: dict[str, int] = {}
    for op in map(opcode, body):
        counts[op] = counts.get(op, 0) + 1
    spill_ops = sum(op.startswith(("STL", "LDL")) for op in ops)
    return {
        "kernel": name, "config": config, **usage,
        "dynamic_shared_bytes": dynamic_shared,
        "spill_instructions": spill_ops,
        "spills": usage["local_bytes"] > 0 or usage["stack_bytes"] > 0 or spill_ops > 0,
        "wgmma": any(op.startswith("HGMMA") for op in ops),
        "cp_async": any(op.startswith("LDGSTS") for op in ops),
        "tma": any(op.startswith(("UTMALDG", "UBLKCP", "UTMASTG")) for op in ops),
        "main_loop": "loop" if loop else "whole kernel (no loop)",
        "main_loop_instructions": len(body),
        "main_loop_16_byte_loads": sum(op.startswith(("LDG.E.128", "LDGSTS.E.BYPASS.128", "LDGSTS.E.128"))
                                       for op in map(opcode, body)),
        "element": element,
        "elements_per_thread_per_iteration": per_iteration,
        "instructions_per_element": round(len(body) / per_iteration, 2),
        "main_loop_top_opcodes": dict(sorted(counts.items(), key=lambda kv: -kv[1])[:12]),
    }


# ------------------------------------------------------------------------------------------- kernels
def token_stats_records(workdir: Path) -> list[dict]:
    from appo.kernels import token_stats as ts

    records = []
    # the target vocabulary in each dtype, and small vocabularies (one masked tile; several rows per program)
    for dtype, itemsize, vocab in (("bf16", 2, TARGET_VOCAB), ("fp16", 2, TARGET_VOCAB),
                                   ("fp32", 4, TARGET_VOCAB), ("bf16", 2, 1_000), ("bf16", 2, 300),
                                   ("fp32", 4, 33)):
        config = ts.launch_config(vocab, itemsize)
        num_warps = config.pop("num_warps")
        arguments = {"logits_ptr": f"*{dtype}", "tokens_ptr": "*i64", "logprobs_ptr": "*fp32",
                     "entropy_ptr": "*fp32", "num_rows": TARGET_ROWS, "vocab_size": vocab,
                     "row_stride": vocab,
                     "scale": 1.4427, "lowest": -1e38}
        kernel = compile_triton(ts._token_stats_kernel, arguments, config, num_warps, config["NUM_STAGES"])
        per_thread = config["ROWS"] * config["K"] * config["VEC"]
        records.append(profile(f"token_stats[{dtype}, V={vocab}]", kernel.asm["cubin"],
                               kernel.metadata.shared,
                               ("LDGSTS", "LDG"), per_thread, "logit", workdir,
                               {**config, "num_warps": num_warps}))
    return records


def linear_records(workdir: Path) -> list[dict]:
    from appo.kernels import linear_token_stats as lts

    cases = [("bf16", entry, False) for entry in lts.GPU_CONFIGS] + [("bf16", lts.GPU_CONFIGS[0], True),
                                                                     ("fp32", lts.GPU_FP32_CONFIG, False)]
    records = []
    for dtype, entry, has_bias in cases:
        import torch

        torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
        config = [c for c in lts.candidate_configs(torch.device("cuda"), torch_dtype, TARGET_HIDDEN)
                  if (c["BLOCK_N"], c["BLOCK_V"], c["BLOCK_K"], c["NUM_STAGES"], c["num_warps"]) == entry][0]
        num_warps = config["num_warps"]
        constexprs = {k: v for k, v in config.items() if k != "num_warps"}
        common = {"hidden_ptr": f"*{dtype}", "weight_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}",
                  "tokens_ptr": "*i64", "num_rows": TARGET_ROWS, "vocab_size": TARGET_VOCAB,
                  "hidden_size": TARGET_HIDDEN, "stride_hidden": TARGET_HIDDEN,
                  "stride_weight": TARGET_HIDDEN,
                  "scale": 1.4427}
        threads = 32 * num_warps
        tile_logits = config["BLOCK_N"] * config["BLOCK_V"] / threads
        label = f"[{dtype}, {'x'.join(map(str, entry[:3]))}, {entry[3]} stages, {entry[4]} warps" + \
                (", bias]" if has_bias else "]")
        forward = compile_triton(lts._forward_kernel, {**common, "partial_ptr": "*fp32", "lowest": -1e38,
                                                       "tiles_per_split": 18},
                                 {**constexprs, "HAS_BIAS": has_bias}, num_warps, config["NUM_STAGES"])
        records.append(gemm_profile("linear_forward" + label, forward, tile_logits, workdir,
                                    {**config, "HAS_BIAS": has_bias}))
        grad = compile_triton(lts._grad_logits_kernel, {**common, "max_ptr": "*fp32", "log2_sum_ptr": "*fp32",
                                                        "upstream_ptr": "*fp32", "dz_ptr": f"*{dtype}",
                                                        "first_row": 0, "chunk_rows": 4096,
                                                        "stride_dz": TARGET_VOCAB},
                              {**constexprs, "HAS_BIAS": has_bias, "GROUP_N": lts.GROUP_N}, num_warps,
                              config["NUM_STAGES"])
        records.append(gemm_profile("linear_grad_logits" + label, grad, tile_logits, workdir,
                                    {**config, "HAS_BIAS": has_bias}))
    return records


def gemm_profile(name: str, kernel, tile_logits: float, workdir: Path, config: dict) -> dict:
    """profile() of a matmul kernel: the main loop is one K step of the tile (its element); the epilogue
    (the work on the finished logits tile, outside the K loop) is counted per logit of the tile."""
    record = profile(name, kernel.asm["cubin"], kernel.metadata.shared, ("HGMMA", "HMMA", "FFMA"), 1,
                     f"K step of the {config['BLOCK_N']}x{config['BLOCK_V']}x{config['BLOCK_K']} tile",
                     workdir, config)
    sass, _ = disassemble(kernel.asm["cubin"], workdir)
    inner = main_loop(sass, ("HGMMA", "HMMA", "FFMA"))
    enclosing = [loop for loop in loops(sass) if loop.first <= inner.first and loop.last >= inner.last
                 and loop is not inner and len(loop.body) > len(inner.body)]
    outer = min(enclosing, key=lambda loop: len(loop.body)).body if enclosing else instructions(sass)[0]
    record["hgmma_per_k_step"] = sum(opcode(i).startswith("HGMMA") for i in inner.body)
    record["epilogue_instructions_per_logit"] = round((len(outer) - len(inner.body)) / tile_logits, 2)
    return record


def future_value_records(workdir: Path) -> list[dict]:
    import math

    from appo.kernels import future_value as fv

    block, scaled = fv._chunk_plan(SCAN_LENGTH, 2 ** (-1 / 32))
    num_warps = 4 if block >= 512 else 1
    common = {"logprobs_ptr": "*fp32", "old_logprobs_ptr": "*fp32", "mask_ptr": "*u8", "sums_ptr": "*fp32",
              "length": SCAN_LENGTH, "num_chunks": math.ceil(SCAN_LENGTH / block), "log2_gamma": -1 / 32,
              "stride_logprobs_row": SCAN_LENGTH, "stride_logprobs_col": 1, "stride_old_row": SCAN_LENGTH,
              "stride_old_col": 1, "stride_mask_row": SCAN_LENGTH, "stride_mask_col": 1}
    per_thread = block / (32 * num_warps)
    records = []
    sums = compile_triton(fv._chunk_sums_kernel, common, {"BLOCK": block}, num_warps, 3)
    records.append(profile("future_value_chunk_sums[fp32, bool mask]", sums.asm["cubin"],
                           sums.metadata.shared, ("LDG",), per_thread, "position", workdir,
                           {"BLOCK": block, "num_warps": num_warps}))
    for scaled_cumsum in (True, False):
        constexprs = {"BLOCK": block, "CARRY_BLOCK": fv._CARRY_BLOCK, "SCALED_CUMSUM": scaled_cumsum}
        scan = compile_triton(fv._scan_kernel, {**common, "out_ptr": "*fp32", "stride_out_row": SCAN_LENGTH},
                              constexprs, num_warps, 3)
        kind = "scaled cumsum" if scaled_cumsum else "pair scan"
        # the kernel's only loop forms the carry; the chunk's scan is straight-line code: count it all
        records.append(profile(f"future_value_scan[fp32, bool mask, {kind}]", scan.asm["cubin"],
                               scan.metadata.shared, ("NO-LOOP",), per_thread, "position", workdir,
                               {**constexprs, "num_warps": num_warps}))
    return records


def gather_records(workdir: Path) -> list[dict]:
    """The CUDA gather (csrc/prefix_cache_kernel.h, compiled alone with nvcc): its three copy loops, each
    with four 16-byte loads per thread and iteration (the element: one 16-byte vector). By length: the
    contiguous copy, the row-strided copy for power-of-two rows (a shift finds the row), and for other
    row widths (a division)."""
    if not (shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists()):
        return [{"kernel": "gather_prefix_kv", "skipped": "nvcc not found: the CUDA gather was not compiled"}]
    wrapper = workdir / "gather.cu"
    wrapper.write_text(f'#include "{REPO / "csrc" / "prefix_cache_kernel.h"}"\n')
    cubin = compile_cuda(wrapper, workdir)
    sass, _ = disassemble(cubin, workdir)
    copy_loops = sorted((loop for loop in loops(sass)
                         if sum(opcode(i).startswith("LDG.E.128") for i in loop.body) >= 4),
                        key=lambda loop: len(loop.body))
    names = ("contiguous rows", "strided rows, power-of-two width", "strided rows, other widths")
    records = []
    for name, loop in zip(names, copy_loops):
        records.append(profile(f"gather_prefix_kv[{name}]", cubin, 0, ("LDG.E.128",), 4, "16-byte vector",
                               workdir, {"threads": 256, "loads_in_flight": 4}, loop=loop))
    return records


def all_records(workdir: Path) -> list[dict]:
    return (token_stats_records(workdir) + linear_records(workdir) + future_value_records(workdir)
            + gather_records(workdir))


def summary_line(record: dict) -> str:
    features = ",".join(name for name in ("wgmma", "cp_async", "tma") if record[name]) or "-"
    spills = "YES" if record["spills"] else "no"
    return (f"{record['kernel']:<58} reg {record['registers']:>3}  spill {spills:<3} "
            f"smem {record['dynamic_shared_bytes'] + record['static_shared_bytes']:>6}  {features:<17} "
            f"{record['instructions_per_element']:>7} instr/{record['element'].split()[0]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the json record here (nothing is written without it)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 replaces the compiler: unset it to compile for sm_90", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as workdir:
        records = all_records(Path(workdir))
    for record in records:
        skipped = record.get("skipped")
        print(f"{record['kernel']:<58} {skipped}" if skipped else summary_line(record))
    if args.out:
        import triton

        payload = {"name": "sm90-static", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "target": "sm_90 (H100/H200), compiled on the CPU", "triton": triton.__version__,
                   "sizes": {"tokens": TARGET_ROWS, "vocab": TARGET_VOCAB, "hidden": TARGET_HIDDEN,
                             "scan_rows": SCAN_ROWS, "scan_length": SCAN_LENGTH},
                   "kernels": records}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"written to {args.out}")
    failed = [r["kernel"] for r in records if r.get("spills")]
    if failed:
        print(f"spills in: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
