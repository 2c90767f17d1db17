"""kvjax's Pallas kernels (installed as `kvjax.pallas_kernels`), each beside a pure-jnp
`*_reference` that the tests compare it with.

    block_sparse_attention.py          prefill / chunks: block-sparse flash attention (Triton,
                                       Mosaic TPU, reference; dispatch table `_KERNELS`)
      block_sparse_attention_mgpu.py   its Hopper (Mosaic GPU) kernel
      block_mask.py                    host-side masks -> block lists (numpy)
    sparse_decode_attention.py         decode over selected blocks (Triton, reference; `_BACKENDS`)
      sparse_decode_attention_tpu.py   its Mosaic TPU kernel
    quantized_decode_attention.py      KIVI decode over packed 2/4/8-bit codes (Triton, reference;
                                       `_BACKENDS`)
      quantized_decode_attention_tpu.py  its Mosaic TPU kernel
    kivi_mgpu/                         the Hopper KIVI decode kernel on its own fragment layout
    _decode_common.py                  what the decode kernels share (input checks, tuning knobs,
                                       online softmax, split merge); imports no kernel module
    _compat.py                         Pallas imports across jax versions; the `backend` vocabulary
    packing.py                         bit packing of low-bit codes (shared with kvjax.quant)
    testing.py                         test helpers (tolerances, interpret mode, cross-lowering)

Every entry point takes `backend=` ("mosaic_gpu", "triton", "mosaic_tpu", "reference"; None: by
device) and `interpret=`; tuning knobs are frozen dataclasses passed as static arguments.
"""
