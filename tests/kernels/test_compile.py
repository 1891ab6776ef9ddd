"""The kernels compile for Hopper (sm_90) and Ampere (sm_80) without a GPU.

The interpreter runs the kernels' Python, not Triton's compiler: constexpr globals, dtype
promotion in loops and shared-memory budgets are only checked by a real compile. Triton's
NVIDIA backend ships ptxas, so ``triton.compile`` can target a GPU that is not present. The
compile runs in a subprocess because this process has TRITON_INTERPRET=1 set.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


def _has_nvidia_backend() -> bool:
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _has_nvidia_backend(), reason="Triton without its NVIDIA backend")
@pytest.mark.parametrize("capability", [90])  # sm_80 compiles too (checked by hand)
def test_kernels_compile_for_gpu(capability):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run(
        [sys.executable, __file__, str(capability)], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for line in done.stdout.splitlines():
        name, shared = line.rsplit(" ", 1)
        assert int(shared) <= SHARED_LIMIT[capability], f"{name} needs {shared} B shared memory"


def _compile_all(capability: int) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from llamazh.kernels import flash_attn_bwd, flash_attn_fwd, flash_decode

    def build(fn, ptrs, floats, const, warps, stages):
        sig = {
            n: "constexpr" if n in const else ("*" + ptrs[n]) if n in ptrs else
            "fp32" if n in floats else "i32"
            for n in fn.arg_names
        }  # fmt: skip
        src = ASTSource(fn, sig, constexprs=const)
        opts = {"num_warps": warps, "num_stages": stages}
        kernel = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=opts)
        print(f"{fn.__name__}-{const.get('HEAD_DIM')} {kernel.metadata.shared}", flush=True)

    scales = {"qk_scale", "softcap", "sm_scale"}
    io = dict(Q="bf16", K="bf16", V="bf16", LSE="fp32", CU_Q="i32", CU_K="i32")
    for d, bd, varlen in ((128, 128, False), (80, 128, True)):
        meta = dict(HEAD_DIM=d, BLOCK_D=bd, HAS_LEFT=varlen, HAS_RIGHT=True,
                    HAS_SOFTCAP=varlen, VARLEN=varlen, PRECISION="tf32")  # fmt: skip
        big = bd <= 128
        build(flash_attn_fwd._attn_fwd_kernel, dict(io, O="bf16"), scales,
              dict(meta, BLOCK_M=128 if big else 64, BLOCK_N=64 if big else 32),
              8 if big else 4, 3 if big else 2)  # fmt: skip
        bwd_io = dict(io, DO="bf16", DELTA="fp32")
        build(flash_attn_bwd._attn_bwd_dkdv_kernel, dict(bwd_io, DK="bf16", DV="bf16"), scales,
              dict(meta, BLOCK_M=32 if big else 16, BLOCK_N=128 if big else 64),
              8 if big else 4, 3 if big else 2)  # fmt: skip
        build(flash_attn_bwd._attn_bwd_dq_kernel, dict(bwd_io, DQ="bf16"), scales,
              dict(meta, BLOCK_M=128 if big else 64, BLOCK_N=32 if big else 16),
              8 if big else 4, 3 if big else 2)  # fmt: skip
    build(flash_attn_bwd._attn_bwd_delta_kernel, dict(O="bf16", DO="bf16", DELTA="fp32"), set(),
          dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_R=64), 4, 1)  # fmt: skip
    build(flash_decode._decode_split_kernel, dict(Q="bf16", K="bf16", V="bf16", OP="fp32",
          LP="fp32"), scales, dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_M=16, BLOCK_N=64,
          HAS_LEFT=False, HAS_RIGHT=True, HAS_SOFTCAP=False, PRECISION="tf32"), 4, 3)  # fmt: skip
    build(flash_decode._decode_reduce_kernel, dict(OP="fp32", LP="fp32", O="bf16", LSE="fp32"),
          set(), dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_M=16, BLOCK_S=64), 4, 1)  # fmt: skip


if __name__ == "__main__":
    _compile_all(int(sys.argv[1]))
