"""What a paged decode kernel's tiling costs an SM, compiled for sm_90 on any machine (no GPU):
shared memory and registers a program, how many programs (and warps) an H100 SM then holds, and
the instructions of its key loop (a warp's, and all warps' over a key) with any register spills.
The FP8 kernel is bound by its instructions a key (Nsight Compute, session 21), so that count is
a CPU-side proxy for its speed: compare tilings by it before timing them on a GPU.

    python -m benchmarks.kernel_resources [--kernel split|balanced] [--kv-dtype fp8_e4m3fn|bf16]
        [--configs n128w4s5,n128w4s3,...]

Needs Triton with its NVIDIA backend (ptxas and cuobjdump ship in its wheel: `pip download
--no-deps --only-binary=:all: "triton==3.*"`, unzip, put it on PYTHONPATH and make its
`backends/nvidia/bin/*` executable). Integer and pointer arguments are compiled as divisible by
16, as the product's launches specialize them, so the loads pipeline as they do on the GPU.
The Llama-3.1-8B attention shape: 4 query heads a KV head, head_dim 128, pages of 16, a bf16 query.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from benchmarks.sass_counts import loop_instructions, spills
from shardline.shards.kv_cache import keys_major_values
from shardline.shards.layers.attention.decode_plan import DecodeConfig
from shardline.shards.layers.attention.triton_decode import _paged_decode_kernel
from shardline.shards.layers.attention.triton_decode_balanced import (
    MIN_BLOCK_B,
    _balanced_decode_kernel,
)

KERNELS = {"split": _paged_decode_kernel, "balanced": _balanced_decode_kernel}
KV_TYPES = {"fp8_e4m3fn": "fp8e4nv", "bf16": "bf16"}
SM90 = GPUTarget("cuda", 90, 32)
SHARED_PER_SM, REGISTERS_PER_SM, MAX_WARPS_PER_SM = 227 * 1024, 65536, 64
REGISTER_UNIT = 256  # registers are handed to a warp in units of 256 (8 a thread)
# Specialized per launch: not divisible by 16 (the last stride of a [rows, heads] lse table).
UNALIGNED = {"stride_lh", "stride_lt", "batch", "num_splits"}


FLOAT32_POINTERS = {"lse_ptr", "part_ptr"}
INT32_POINTERS = {"block_tables_ptr", "context_lens_ptr", "counter_ptr"}
CACHE_POINTERS = {"k_cache_ptr", "v_cache_ptr"}
FLOAT32_SCALARS = {"qk_scale", "softcap"}


def signature(kernel: triton.JITFunction, kv_type: str, constants: dict) -> dict[str, str]:
    """Each argument's Triton type: pointers by what they point at, bf16 for the query and the
    output, i32 for sizes and strides."""

    def type_of(name: str) -> str:
        if name in constants:
            return "constexpr"
        if name in CACHE_POINTERS:
            return f"*{kv_type}"
        if name in FLOAT32_POINTERS:
            return "*fp32"
        if name in INT32_POINTERS:
            return "*i32"
        if name in FLOAT32_SCALARS:
            return "fp32"
        return "*bf16" if name.endswith("_ptr") else "i32"

    return {name: type_of(name) for name in kernel.arg_names}


def constants(kernel: str, config: DecodeConfig, fp8: bool) -> dict[str, object]:
    """The kernel's constants, the V cache laid out as KVCache.allocate lays it out for the cache's
    dtype, its stride of 1 specialized as a launch specializes it."""
    keys_major = keys_major_values(torch.float8_e4m3fn if fp8 else torch.bfloat16)
    shape = dict(
        GROUP=4, BLOCK_G=16, HEAD_DIM=128, BLOCK_D=128, PAGE_SIZE=16, BLOCK_N=config.block_n,
        WINDOW=0, DOT_PRECISION="tf32", HAS_ALIBI=False, SOFTCAP=False, FP8_IN_FP16=fp8,
        V_KEYS_MAJOR=keys_major, USE_PDL=False,
    )  # fmt: skip
    shape["stride_vt" if keys_major else "stride_vd"] = 1
    if kernel == "split":
        shape |= dict(SPLIT=False, LAST_MERGES=False)
    else:
        shape |= dict(BLOCK_B=MIN_BLOCK_B, LAST_MERGES=True)
    return shape


@dataclass(frozen=True)
class Compiled:
    shared: int  # bytes a program
    registers: int  # a thread
    loop_instructions: int  # a warp's, once around the key loop
    spills: int  # local-memory stores

    def instructions_a_key(self, config: DecodeConfig) -> float:
        return self.loop_instructions * config.num_warps / config.block_n


def cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
        return subprocess.run(
            [str(tool), flag, str(path)], capture_output=True, text=True, check=True
        ).stdout


def compile_for_sm90(kernel_name: str, kv_dtype: str, config: DecodeConfig) -> Compiled:
    kernel = KERNELS[kernel_name]
    consts = constants(kernel_name, config, kv_dtype != "bf16")
    types = signature(kernel, KV_TYPES[kv_dtype], consts)
    index = {name: (i,) for i, name in enumerate(kernel.arg_names)}
    aligned = [n for n, t in types.items() if t not in ("constexpr", "fp32") and n not in UNALIGNED]
    source = ASTSource(
        fn=kernel,
        signature=types,
        constexprs={index[name]: value for name, value in consts.items()},
        attrs={index[name]: [["tt.divisibility", 16]] for name in aligned},
    )
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    compiled = triton.compile(source, target=SM90, options=options)
    sass = cuobjdump(compiled.asm["cubin"], "-sass")
    usage = cuobjdump(compiled.asm["cubin"], "-res-usage")
    return Compiled(
        shared=compiled.metadata.shared,
        registers=int(re.search(r"REG:(\d+)", usage).group(1)),
        loop_instructions=loop_instructions(sass),
        spills=spills(sass),
    )


def programs_per_sm(shared: int, regs: int, warps: int) -> int:
    by_shared = SHARED_PER_SM // max(shared, 1)
    warp_registers = -(-regs * 32 // REGISTER_UNIT) * REGISTER_UNIT
    by_registers = REGISTERS_PER_SM // (warp_registers * warps)
    return min(by_shared, by_registers, MAX_WARPS_PER_SM // warps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", choices=KERNELS, default="split")
    parser.add_argument("--kv-dtype", choices=KV_TYPES, default="fp8_e4m3fn")
    parser.add_argument("--configs", default="n128w4s5,n128w4s3,n128w8s5,n64w4s5")
    args = parser.parse_args()
    for name in args.configs.split(","):
        config = DecodeConfig.parse(name)
        compiled = compile_for_sm90(args.kernel, args.kv_dtype, config)
        programs = programs_per_sm(compiled.shared, compiled.registers, config.num_warps)
        print(
            f"{args.kernel} {args.kv_dtype} {name:12s} shared {compiled.shared / 1024:6.1f} KB"
            f"  registers {compiled.registers:3d}  programs an SM {programs:2d}"
            f"  warps an SM {programs * config.num_warps:2d}"
            f"  key loop {compiled.loop_instructions:4d} instructions a warp,"
            f" {compiled.instructions_a_key(config):5.1f} a key  spills {compiled.spills}",
            flush=True,
        )


if __name__ == "__main__":
    main()
