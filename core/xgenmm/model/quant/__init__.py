"""Weight-only quantization applied at load time from the official bf16 / float32 checkpoint (engine option
`quantization=`): every language-model linear layer and the LM head. With int8 / int4 the vision tower's and the perceiver's linears keep
int8 weights at rest (`Int8StoredLinear`) but compute in the model dtype as before: their batches are hundreds of rows,
compute-bound, where a weight-only kernel would not pay, so only their memory is halved.

    int8  per-output-channel symmetric int8; CPU: our AVX2 kernel (`cpu_kernels`), else ATen's `_weight_int8pack_mm`;
          CUDA (compute capability >= 8.0): our Triton GEMM (`triton_int8.py`); all batch-invariant
    int4  CPU: round-to-nearest, asymmetric groups of 128 inputs, ATen's `_weight_int4pack_mm_for_cpu`
    fp8   E4M3 weights (per-channel scales) and per-token E4M3 activations, `torch._scaled_mm` (Hopper-class GPUs;
          also runs on CPU through oneDNN, which is how its logic is tested here)

`quantized_cache_dir=` keeps the quantized weights (safetensors + a json saying what they are), so the next start
reads them instead of quantizing again. See docs/quantization.md.
"""

from .linears import (
    QUANTIZED_LINEARS,
    Fp8Linear,
    Int4WeightOnlyLinear,
    Int8StoredLinear,
    Int8WeightOnlyLinear,
    QuantizedLinear,
)
from .loading import QUANTIZATION_METHODS, check_quantization, load_quantized_into, quantize_language_model

__all__ = [
    "QUANTIZATION_METHODS",
    "QUANTIZED_LINEARS",
    "Fp8Linear",
    "Int4WeightOnlyLinear",
    "Int8StoredLinear",
    "Int8WeightOnlyLinear",
    "QuantizedLinear",
    "check_quantization",
    "load_quantized_into",
    "quantize_language_model",
]
