/* How fast one core reads a payload the size of the 4096x4096 layer's factors (411 840
 * floats) from memory: a 64 MB buffer is read first to evict it, then the payload is
 * summed with four AVX2 accumulators; medians of 200 runs, and the same with the payload
 * in cache. Build and run: cc -O2 -mavx2 benchmarks/stream_probe.c -o stream_probe && ./stream_probe */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double seconds(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static float sum(const float* p, long n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (long i = 0; i + 32 <= n; i += 32) {
    a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p + i));
    a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p + i + 8));
    a2 = _mm256_add_ps(a2, _mm256_loadu_ps(p + i + 16));
    a3 = _mm256_add_ps(a3, _mm256_loadu_ps(p + i + 24));
  }
  float out[8];
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  return out[0] + out[7];
}

static int by_value(const void* a, const void* b) {
  const double x = *(const double*)a, y = *(const double*)b;
  return (x > y) - (x < y);
}

static double median_us(const float* payload, long n, const float* evict, long evict_n) {
  double t[200];
  volatile float sink = 0;
  for (int r = 0; r < 200; ++r) {
    if (evict) sink += sum(evict, evict_n);
    const double t0 = seconds();
    sink += sum(payload, n);
    t[r] = seconds() - t0;
  }
  qsort(t, 200, sizeof t[0], by_value);
  return t[100] * 1e6;
}

int main(void) {
  const long n = 411840, big = 16L << 20;
  float* payload = aligned_alloc(64, n * sizeof(float));
  float* evict = aligned_alloc(64, big * sizeof(float));
  if (!payload || !evict) return 1;
  for (long i = 0; i < n; ++i) payload[i] = 1.0f;
  for (long i = 0; i < big; ++i) evict[i] = 1.0f;
  const double cold = median_us(payload, n, evict, big), hot = median_us(payload, n, NULL, 0);
  printf("payload %.2f MB: from memory %.1f us (%.1f GB/s), in cache %.1f us (%.1f GB/s)\n", n * 4e-6, cold,
         n * 4e-3 / cold, hot, n * 4e-3 / hot);
  free(payload);
  free(evict);
  return 0;
}
