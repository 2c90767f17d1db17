"""Hopper (Mosaic GPU) kernel of `block_sparse_attention`: FlashAttention-3 structure (Shah et
al. 2024, https://arxiv.org/abs/2407.08608) adapted from jax's `attention_mgpu.py` (Apache-2.0)
to block-sparse key lists, per-row key lengths, GQA, a softmax scale and a natural-log LSE.

One CTA = 3 warpgroups: two compute warpgroups (block_q query rows each, wgmma for QK^T and PV,
online softmax in registers) and one memory warpgroup that streams only the listed K/V blocks
through a `num_stages`-deep TMA ring. Both compute warpgroups walk the same key-block list (the
metadata is built per 2 * block_q rows), so the pipeline needs no per-warpgroup epilogue;
blocks flagged partial (or crossing the row's length) get an element mask. Tiles are issued
heaviest first (reverse order) so causal grids end with short CTAs.

Checked on the GPU by `benchmarks/kernels_bench.py` (section "correct"); on CPU the tests only
lower it for a CUDA target, because jax's Mosaic GPU interpreter cannot run wgmma accumulators
(`run_state`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from ._compat import pl, plgpu

_NEG_INIT = -1e30
_LN2 = math.log(2.0)


def mgpu_block_sparse_attention(q, k, v, meta, lengths, *, spec, scale, bs, has_lengths):
    """q [B,T,Nq,H], k/v [B,S,N,H] (bf16/f16); meta = (counts [B,Hm,nt] (blocks inside each
    row's length), indices/partial [Hm,nt,maxk]) for tiles of 2 * bs.block_q rows; lengths [B] int32. -> (out, lse [B,T,Nq])."""
    if plgpu is None:
        raise RuntimeError(f"jax {jax.__version__} has no Mosaic GPU Pallas backend")
    b, t, nq, h = q.shape
    n = k.shape[2]
    g = nq // n
    dtype = q.dtype
    counts, indices, partial = meta
    per_head = indices.shape[0] > 1
    bq, bk = bs.block_q, bs.block_kv
    steps = max(2, bs.num_stages)
    tile = 2 * bq
    num_tiles = t // tile
    elem_mask = spec.causal or spec.window is not None or has_lengths
    qk_scale = scale * math.log2(math.e)

    def kernel(q_ref, k_ref, v_ref, cnt_ref, idx_ref, flg_ref, len_ref, out_ref, lse_ref, scoped):
        batch = lax.axis_index("batch")
        q_head = lax.axis_index("heads")
        tile_id = num_tiles - 1 - lax.axis_index("q_seq")
        hs = q_head if per_head else 0
        smem_buffers, buffer_barriers, consumed_barriers, schedule_barrier = scoped
        wg_idx = lax.axis_index("wg")
        qo_smem2, k_smem, v_smem, lse_smem2 = smem_buffers
        k_barriers, v_barriers, q_barriers = buffer_barriers
        k_consumed_barriers, v_consumed_barriers = consumed_barriers

        length = len_ref[batch]
        kv_steps = cnt_ref[batch, hs, tile_id]  # listed blocks inside the row's length

        def perform_schedule_barrier():
            plgpu.barrier_arrive(schedule_barrier)
            plgpu.barrier_wait(schedule_barrier)

        @pl.when(wg_idx < 2)
        def _compute_wg():
            plgpu.set_max_registers(232, action="increase")
            qo_smem = qo_smem2.at[wg_idx]
            lse_smem = lse_smem2.at[wg_idx]
            q_seq_base = tile_id * tile + wg_idx * bq
            plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q_seq_base, bq), q_head], qo_smem, q_barriers.at[wg_idx])
            plgpu.barrier_wait(q_barriers.at[wg_idx])

            m_i = plgpu.layout_cast(jnp.full((bq,), _NEG_INIT, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            l_i = plgpu.layout_cast(jnp.full((bq,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            acc = plgpu.layout_cast(jnp.full((bq, h), 0, jnp.float32), plgpu.Layout.WGMMA)

            @pl.when(kv_steps > 0)
            def _():
                plgpu.barrier_wait(k_barriers.at[0])

            pl.when(wg_idx == 1)(perform_schedule_barrier)

            def kv_loop(kv_step, carry):
                acc, m_i, l_i = carry
                slot = lax.rem(kv_step, jnp.int32(steps))
                kv_start = idx_ref[hs, tile_id, kv_step] * bk

                def compute_qk(acc_ref):
                    plgpu.wgmma(acc_ref, qo_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                    perform_schedule_barrier()
                    return acc_ref[...]

                qk = pl.run_scoped(compute_qk, plgpu.ACC((bq, bk), jnp.float32))
                plgpu.barrier_arrive(k_consumed_barriers.at[slot])

                if elem_mask:
                    needs = flg_ref[hs, tile_id, kv_step] != 0
                    if has_lengths:
                        needs = needs | (kv_start + bk > length)

                    def _mask(x):
                        qi = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 0, layout=plgpu.Layout.WGMMA)
                        kj = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1, layout=plgpu.Layout.WGMMA)
                        qpos = qi + (q_seq_base + spec.q_offset)
                        kpos = kj + kv_start
                        vis = None
                        if has_lengths:
                            vis = kpos < length
                        if spec.causal:
                            c = kpos <= qpos
                            vis = c if vis is None else vis & c
                        if spec.window is not None:
                            w = (qpos - kpos) < spec.window
                            vis = w if vis is None else vis & w
                        return jnp.where(vis, x, -jnp.inf)

                    qk = lax.cond(needs, _mask, lambda x: x, qk)

                m_ij = jnp.maximum(m_i, qk.max(axis=1) * qk_scale)
                alpha = jnp.exp2(m_i - m_ij)
                m_i = m_ij
                p = jnp.exp2(qk * qk_scale - lax.broadcast_in_dim(m_ij, qk.shape, [0]))
                acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
                l_i *= alpha
                p16 = p.astype(dtype)

                def end_softmax_barriers():
                    plgpu.barrier_arrive(schedule_barrier)
                    plgpu.barrier_wait(v_barriers.at[slot])
                    plgpu.barrier_wait(schedule_barrier)

                if h <= 128:
                    l_i += p.sum(axis=1)
                    acc, l_i, m_i, p16 = lax.optimization_barrier((acc, l_i, m_i, p16))
                    end_softmax_barriers()
                else:
                    end_softmax_barriers()
                    l_i += p.sum(axis=1)

                def compute_pv(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                    wait_step = kv_step + 1
                    wait_slot = lax.rem(wait_step, jnp.int32(steps))

                    @pl.when(wait_step < kv_steps)
                    def _wait():
                        plgpu.barrier_wait(k_barriers.at[wait_slot])

                acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_consumed_barriers.at[slot])
                return acc, m_i, l_i

            acc, m_i, l_i = lax.fori_loop(0, kv_steps, kv_loop, (acc, m_i, l_i))
            pl.when(wg_idx == 0)(perform_schedule_barrier)

            seen = l_i > 0
            l_safe = jnp.where(seen, l_i, jnp.full_like(l_i, 1.0))
            acc /= lax.broadcast_in_dim(l_safe, (bq, h), [0])
            qo_smem[...] = acc.astype(dtype)
            lse = (m_i + jnp.log2(l_safe)) * _LN2
            lse_smem[...] = jnp.where(seen, lse, jnp.full_like(lse, -jnp.inf))
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[batch, pl.ds(q_seq_base, bq), q_head])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, q_head, pl.ds(q_seq_base, bq)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg_idx == 2)
        def _memory_wg():
            plgpu.set_max_registers(40, action="decrease")
            kv_head = lax.div(q_head, jnp.int32(g))

            def fetch(step, slot):
                s = (batch, pl.ds(idx_ref[hs, tile_id, step] * bk, bk), kv_head)
                return s

            for i in range(steps):

                @pl.when(i < kv_steps)
                def _prologue():
                    s = fetch(i, i)
                    plgpu.copy_gmem_to_smem(k_ref.at[s], k_smem.at[i], k_barriers.at[i])
                    plgpu.copy_gmem_to_smem(v_ref.at[s], v_smem.at[i], v_barriers.at[i])

            @pl.loop(0, kv_steps - steps)
            def _kv_loop(kv_step):
                tma_step = kv_step + steps
                tma_slot = lax.rem(kv_step, jnp.int32(steps))
                s = fetch(tma_step, tma_slot)
                plgpu.barrier_wait(k_consumed_barriers.at[tma_slot])
                plgpu.copy_gmem_to_smem(k_ref.at[s], k_smem.at[tma_slot], k_barriers.at[tma_slot])
                plgpu.barrier_wait(v_consumed_barriers.at[tma_slot])
                plgpu.copy_gmem_to_smem(v_ref.at[s], v_smem.at[tma_slot], v_barriers.at[tma_slot])

    def entry(q_ref, k_ref, v_ref, cnt_ref, idx_ref, flg_ref, len_ref, out_ref, lse_ref):
        tiling = plgpu.TilingTransform((8, 64))
        swizzle = plgpu.SwizzleTransform(128)
        qo_scratch = plgpu.SMEM((2, bq, h), dtype, transforms=(tiling, swizzle))
        k_scratch = plgpu.SMEM((steps, bk, h), dtype, transforms=(tiling, swizzle))
        v_scratch = plgpu.SMEM((steps, bk, h), dtype, transforms=(tiling, swizzle))
        lse_scratch = plgpu.SMEM((2, bq), jnp.float32)
        pl.run_scoped(
            lambda *args: kernel(q_ref, k_ref, v_ref, cnt_ref, idx_ref, flg_ref, len_ref, out_ref, lse_ref, args),
            (qo_scratch, k_scratch, v_scratch, lse_scratch),
            (plgpu.Barrier(num_barriers=steps), plgpu.Barrier(num_barriers=steps), plgpu.Barrier(num_barriers=2)),
            (plgpu.Barrier(num_arrivals=2, num_barriers=steps),) * 2,
            plgpu.Barrier(num_arrivals=2),
            collective_axes="wg",
        )

    out, lse = plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((b, nq, t), jnp.float32)),
        grid=(nq, num_tiles, b),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(q, k, v, counts, indices, partial, lengths)
    return out, jnp.swapaxes(lse, 1, 2)
