"""The compiled (non-interpreted) Triton path builds for an A100 (sm_80) and an H100 (sm_90) without a GPU.

CI runs the kernels through the interpreter only; this ahead-of-time compile to sm_90 machine
code for both architectures catches what the interpreter does not see: native bf16 ``tl.dot``, ``input_precision``,
``element_ty`` casts, shared-memory budgets.
"""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from zephyr_kernels import triton_tiled as tk

    SCALARS = dict(V="i32", D="i32", S="i32", stride_h="i32", stride_w="i32", inv_temp="fp32", softcap="fp32")

    SMEM = {80: 163 * 1024, 90: 227 * 1024}  # usable shared memory per block

    def build(kernel, dt, cc, **consts):
        consts.update(HAS_BIAS=True, SOFTCAP=True, UPCAST=False, IEEE=dt == "fp32", BLOCK_N=64, BLOCK_V=128, BLOCK_D=64)
        ptrs = dict(H="*" + dt, W="*" + dt, Bias="*" + dt, T="*i64", ORDER="*i32", NVALID="*i32", SEG="*i64")
        sig = {a: "constexpr" if a in consts else SCALARS.get(a, ptrs.get(a, "*fp32")) for a in kernel.arg_names}
        k = triton.compile(ASTSource(kernel, sig, consts), target=GPUTarget("cuda", cc, 32), options=dict(num_warps=8))
        assert k.metadata.shared <= SMEM[cc], (cc, k.metadata.shared)
        print(kernel.__name__, dt, f"sm_{cc}", "shared", k.metadata.shared)

    from zephyr_kernels import triton_chunked as tc

    def build_epilogue(kernel, dz_dt, cc, **consts):
        consts = dict(dict(SOFTCAP=True, BLOCK_V=4096, FILTER=False, FLAG_K=64), **consts)
        consts = {k: v for k, v in consts.items() if k in kernel.arg_names}
        scal = dict(stride_z="i64", V="i32", col0="i32", ignore_index="i32", inv_temp="fp32", softcap="fp32",
                    n_kt="i32", flag_rows="i32", eps="fp32")
        ptrs = dict(T="*i64", DZ="*" + dz_dt, FLAGS="*i32")
        sig = {a: "constexpr" if a in consts else scal.get(a, ptrs.get(a, "*fp32")) for a in kernel.arg_names}
        k = triton.compile(ASTSource(kernel, sig, consts), target=GPUTarget("cuda", cc, 32), options=dict(num_warps=8))
        assert k.metadata.shared <= SMEM[cc], (cc, k.metadata.shared)
        print(kernel.__name__, dz_dt, f"sm_{cc}", "shared", k.metadata.shared)

    from zephyr_kernels import triton_sparse as ts

    def build_sparse(kernel, dt, out_dt, cc):
        consts = dict(ACCUMULATE=True, UPCAST=False, IEEE=dt == "fp32", BLOCK_M=64, BLOCK_K=64, BLOCK_D=128)
        ptrs = dict(DZ="*" + dt, W="*" + dt, H="*" + dt, OUT="*" + out_dt, FLAGS="*i32")
        sig = {a: "constexpr" if a in consts else ptrs.get(a, "i32") for a in kernel.arg_names}
        k = triton.compile(ASTSource(kernel, sig, consts), target=GPUTarget("cuda", cc, 32), options=dict(num_warps=4))
        assert k.metadata.shared <= SMEM[cc], (cc, k.metadata.shared)
        print(kernel.__name__, dt, out_dt, f"sm_{cc}", "shared", k.metadata.shared)

    for cc in (80, 90):
        build(tk._stats_kernel, "bf16", cc, HAS_ZSUM=True, HAS_SEG=True)
        build(tk._grad_kernel, "bf16", cc, HAS_C=True, COMPUTE_DX=True, COMPUTE_DW=True, COMPUTE_DB=True)
        build(tk._grad_kernel, "fp32", cc, HAS_C=True, COMPUTE_DX=True, COMPUTE_DW=True, COMPUTE_DB=True)
        build_epilogue(tc._row_stats_kernel, "fp32", cc, HAS_ZSUM=True)
        build_epilogue(tc._row_grad_kernel, "bf16", cc, HAS_C=True)
        build_epilogue(tc._row_grad_kernel, "bf16", cc, HAS_C=False, FILTER=True)
        # as the bf16 passes call them: dX into fp32, dW into the weight's dtype or the fp32 accumulator
        build_sparse(ts._dx_kernel, "bf16", "fp32", cc)
        build_sparse(ts._dw_kernel, "bf16", "bf16", cc)
        build_sparse(ts._dw_kernel, "bf16", "fp32", cc)
    """
)


def test_triton_kernels_compile_for_sm80_and_sm90():
    """Both Triton backends: the tiled kernels, the GEMM-epilogue kernels and the block-sparse GEMMs."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip(f"this triton wheel ships no ptxas ({ptxas}); cannot compile for CUDA without a toolkit")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("shared") == 2 * (5 + 1 + 3), out.stdout
