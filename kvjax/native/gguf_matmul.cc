// y[M, N] = x[M, K] @ W^T for W [N, K] stored as GGUF (llama.cpp) quantized blocks, on the CPU.
//
// XLA FFI custom calls, one per block type:
//   kvjax_gguf_matmul_q4_1: 32 weights per 20-byte block {fp16 d, fp16 m, 16 bytes of nibbles};
//                           byte j holds weight j (low nibble) and weight j + 16 (high nibble);
//                           w = d * q + m.
//   kvjax_gguf_matmul_q8_0: 32 weights per 34-byte block {fp16 d, 32 x int8 q}; w = d * q.
// Operands: x float32 [M, K]; blocks uint8 [N, K / 32 * block_bytes] (row n holds W[n, :]);
// result float32 [M, N].
//
// Numerics: each weight is dequantized exactly as gguf.quants does (d * q is exact in float32:
// an 11-bit fp16 mantissa times an at most 8-bit integer, so fma(d, q, m) == d * q + m), then
// multiplied with x in float32. The result equals x @ dequantize(W)^T up to summation order; the
// activations are never quantized (llama.cpp's CPU path rounds x to 8 bits; this does not).
//
// Speed: the blocks are 6.4x (Q4_1: 5 bits per weight) or 3.8x (Q8_0) smaller than float32, and
// a decode step reads every weight once. Each block is dequantized once into registers and used
// for all M rows of x. AVX-512 (16 floats per vector) or AVX2 + FMA + F16C (8) when the compiler
// targets them (built with -march=native), a portable scalar loop otherwise; a software prefetch
// runs 2 KB ahead along the blocks. Rows of W are split into chunks that the
// calling thread and XLA's intra-op thread pool claim from an atomic counter; the caller only
// waits for chunks that are already running, so a pool that runs tasks late (or never in
// parallel) cannot deadlock it.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define KVJAX_AVX2 1
#else
#define KVJAX_AVX2 0
#endif
#if KVJAX_AVX2 && defined(__AVX512F__)
#define KVJAX_AVX512 1
#else
#define KVJAX_AVX512 0
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 32;
// Software prefetch distance along the blocks (bytes), on top of the hardware prefetcher: each
// weight row is streamed once, so the loads are issued this far ahead of their use (the distance
// was chosen by timing on the AVX-512 Xeon of BENCHMARKS.md, CPU generation).
constexpr int64_t kPrefetchBytes = 2048;

float Fp16ToFloat(uint16_t h) {
#if KVJAX_AVX2
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;  // +-0
  } else {  // subnormal: normalise
    exp = 113u;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

float LoadFp16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof(h));
  return Fp16ToFloat(h);
}

struct Q4_1 {
  static constexpr int64_t kBytes = 20;
};
struct Q8_0 {
  static constexpr int64_t kBytes = 34;
};

// ---------------------------------------------------------------------------------------------
// Scalar path (any compiler / CPU): dequantize one block into w[32].

inline void DequantBlock(Q4_1, const uint8_t* b, float* w) {
  const float d = LoadFp16(b), m = LoadFp16(b + 2);
  for (int j = 0; j < 16; ++j) {
    w[j] = d * static_cast<float>(b[4 + j] & 0x0f) + m;
    w[j + 16] = d * static_cast<float>(b[4 + j] >> 4) + m;
  }
}

inline void DequantBlock(Q8_0, const uint8_t* b, float* w) {
  const float d = LoadFp16(b);
  for (int j = 0; j < 32; ++j) w[j] = d * static_cast<float>(static_cast<int8_t>(b[2 + j]));
}

// Rows [n0, n1) of y for all M rows of x.
template <typename T>
void RowsScalar(const float* x, const uint8_t* wq, float* y, int64_t M, int64_t N, int64_t K, int64_t n0,
                int64_t n1) {
  const int64_t nb = K / kBlock;
  float w[kBlock];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = wq + n * nb * T::kBytes;
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = 0.0f;
    for (int64_t b = 0; b < nb; ++b) {
      DequantBlock(T{}, row + b * T::kBytes, w);
      for (int64_t m = 0; m < M; ++m) {
        const float* xb = x + m * K + b * kBlock;
        float s = 0.0f;
        for (int j = 0; j < kBlock; ++j) s += xb[j] * w[j];
        y[m * N + n] += s;
      }
    }
  }
}

#if KVJAX_AVX2
// ---------------------------------------------------------------------------------------------
// AVX2 path: one block -> four vectors of eight float32 weights (weights 0-7, 8-15, 16-23, 24-31).

inline void DequantBlock8(Q4_1, const uint8_t* b, __m256* w) {
  const __m256 d = _mm256_set1_ps(LoadFp16(b));
  const __m256 m = _mm256_set1_ps(LoadFp16(b + 2));
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 4));
  const __m128i mask = _mm_set1_epi8(0x0f);
  const __m128i lo = _mm_and_si128(raw, mask);                     // weights 0..15
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);  // weights 16..31
  w[0] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), m);
  w[1] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), m);
  w[2] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), m);
  w[3] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), m);
}

inline void DequantBlock8(Q8_0, const uint8_t* b, __m256* w) {
  const __m256 d = _mm256_set1_ps(LoadFp16(b));
  const __m128i q0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2));
  const __m128i q1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 18));
  w[0] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q0)));
  w[1] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q0, 8))));
  w[2] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q1)));
  w[3] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q1, 8))));
}

inline float HSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One row n of W against R (1..4) rows of x: each block is dequantized once and used R times;
// two accumulators per x row halve the FMA dependency chain.
template <typename T, int R>
inline void RowAvx2(const float* x, const uint8_t* row, float* y, int64_t N, int64_t K) {
  const int64_t nb = K / kBlock;
  __m256 a0[R], a1[R], w[4];
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    _mm_prefetch(reinterpret_cast<const char*>(row + b * T::kBytes + kPrefetchBytes), _MM_HINT_T0);
    DequantBlock8(T{}, row + b * T::kBytes, w);
    for (int r = 0; r < R; ++r) {
      const float* xb = x + r * K + b * kBlock;
      a0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xb), w[0], a0[r]);
      a1[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 8), w[1], a1[r]);
      a0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 16), w[2], a0[r]);
      a1[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 24), w[3], a1[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[r * N] = HSum(_mm256_add_ps(a0[r], a1[r]));
}

#endif  // KVJAX_AVX2

#if KVJAX_AVX512
// ---------------------------------------------------------------------------------------------
// AVX-512 path: one block -> two vectors of sixteen float32 weights (weights 0-15, 16-31).

inline void DequantBlock16(Q4_1, const uint8_t* b, __m512* w) {
  const __m512 d = _mm512_set1_ps(LoadFp16(b));
  const __m512 m = _mm512_set1_ps(LoadFp16(b + 2));
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 4));
  const __m128i mask = _mm_set1_epi8(0x0f);
  w[0] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(raw, mask))), m);
  w[1] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), mask))), m);
}

inline void DequantBlock16(Q8_0, const uint8_t* b, __m512* w) {
  const __m512 d = _mm512_set1_ps(LoadFp16(b));
  const __m128i q0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2));
  const __m128i q1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 18));
  w[0] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)));
  w[1] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)));
}

template <typename T, int R>
inline void RowAvx512(const float* x, const uint8_t* row, float* y, int64_t N, int64_t K) {
  const int64_t nb = K / kBlock;
  __m512 a0[R], a1[R], w[2];
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    _mm_prefetch(reinterpret_cast<const char*>(row + b * T::kBytes + kPrefetchBytes), _MM_HINT_T0);
    DequantBlock16(T{}, row + b * T::kBytes, w);
    for (int r = 0; r < R; ++r) {
      const float* xb = x + r * K + b * kBlock;
      a0[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xb), w[0], a0[r]);
      a1[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xb + 16), w[1], a1[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[r * N] = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]));
}

#endif  // KVJAX_AVX512

#if KVJAX_AVX512 || KVJAX_AVX2
// Rows [n0, n1) of W against every row of x, x's rows taken four at a time (one register block
// each): row_kernel(std::integral_constant<int, R>, x, w_row, y, N, K) computes R outputs.
template <typename T, typename RowKernel>
void RowsVector(const float* x, const uint8_t* wq, float* y, int64_t M, int64_t N, int64_t K, int64_t n0,
                int64_t n1, RowKernel row_kernel) {
  const int64_t row_bytes = K / kBlock * T::kBytes;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = wq + n * row_bytes;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) row_kernel(std::integral_constant<int, 4>{}, x + m * K, row, y + m * N + n, N, K);
    switch (M - m) {
      case 3: row_kernel(std::integral_constant<int, 3>{}, x + m * K, row, y + m * N + n, N, K); break;
      case 2: row_kernel(std::integral_constant<int, 2>{}, x + m * K, row, y + m * N + n, N, K); break;
      case 1: row_kernel(std::integral_constant<int, 1>{}, x + m * K, row, y + m * N + n, N, K); break;
      default: break;
    }
  }
}
#endif

template <typename T>
void Rows(const float* x, const uint8_t* wq, float* y, int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
#if KVJAX_AVX512
  RowsVector<T>(x, wq, y, M, N, K, n0, n1, [](auto r, const float* xr, const uint8_t* row, float* yr, int64_t n,
                                              int64_t k) { RowAvx512<T, decltype(r)::value>(xr, row, yr, n, k); });
#elif KVJAX_AVX2
  RowsVector<T>(x, wq, y, M, N, K, n0, n1, [](auto r, const float* xr, const uint8_t* row, float* yr, int64_t n,
                                              int64_t k) { RowAvx2<T, decltype(r)::value>(xr, row, yr, n, k); });
#else
  RowsScalar<T>(x, wq, y, M, N, K, n0, n1);
#endif
}

// ---------------------------------------------------------------------------------------------
// Work sharing over rows of W.

struct Job {
  const float* x;
  const uint8_t* wq;
  float* y;
  int64_t M, N, K, chunk, num_chunks;
  void (*rows)(const float*, const uint8_t*, float*, int64_t, int64_t, int64_t, int64_t, int64_t);
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;

  // Claims and runs chunks until none is left.
  void Work() {
    for (int64_t c; (c = next.fetch_add(1)) < num_chunks;) {
      const int64_t n0 = c * chunk, n1 = std::min(N, n0 + chunk);
      rows(x, wq, y, M, N, K, n0, n1);
      if (done.fetch_add(1) + 1 == num_chunks) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
};

template <typename T>
ffi::Error Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> blocks,
                ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto bd = blocks.dimensions();
  if (xd.size() != 2 || bd.size() != 2) {
    return ffi::Error::InvalidArgument("gguf_matmul: x and blocks must be 2-D, got ranks " +
                                       std::to_string(xd.size()) + " and " + std::to_string(bd.size()));
  }
  const int64_t M = xd[0], K = xd[1], N = bd[0];
  if (K % kBlock != 0) {
    return ffi::Error::InvalidArgument("gguf_matmul: K=" + std::to_string(K) + " must be a multiple of 32");
  }
  if (bd[1] != K / kBlock * T::kBytes) {
    return ffi::Error::InvalidArgument("gguf_matmul: blocks have " + std::to_string(bd[1]) +
                                       " bytes per row, expected K/32*" + std::to_string(T::kBytes) + "=" +
                                       std::to_string(K / kBlock * T::kBytes) + " for K=" + std::to_string(K));
  }
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::fill(y->typed_data(), y->typed_data() + M * N, 0.0f);
    return ffi::Error::Success();
  }
  const int64_t hw = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), hw));
  // ~4 chunks per worker for load balance, at least 8 rows each.
  const int64_t chunk = std::max<int64_t>(8, (N + 4 * workers - 1) / (4 * workers));
  auto job = std::make_shared<Job>();
  job->x = x.typed_data();
  job->wq = blocks.typed_data();
  job->y = y->typed_data();
  job->M = M;
  job->N = N;
  job->K = K;
  job->chunk = chunk;
  job->num_chunks = (N + chunk - 1) / chunk;
  job->rows = &Rows<T>;
  const int64_t helpers = std::min(workers, job->num_chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([job] { job->Work(); });
  job->Work();
  std::unique_lock<std::mutex> lock(job->mu);
  job->cv.wait(lock, [&] { return job->done.load() == job->num_chunks; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KvjaxGgufMatmulQ4_1, Impl<Q4_1>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KvjaxGgufMatmulQ8_0, Impl<Q8_0>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// Which code path this build took (2: AVX-512, 1: AVX2/FMA/F16C, 0: portable scalar); read
// through ctypes.
extern "C" int kvjax_gguf_matmul_simd() { return KVJAX_AVX512 ? 2 : KVJAX_AVX2; }
