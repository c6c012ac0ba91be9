/* A stand-in libcuda.so.1 for tests/transfer/test_driver_abi.py: the few driver entry points that
 * kvsched reaches through the real cuda-bindings driver module (cuGetProcAddress for the batched
 * copy, error names, module load and kernel launch), recording what they were given. Its
 * cuMemcpyBatchAsync at the CUDA 12.8 ABI really copies (the test passes host addresses); the
 * 13.0 entry point fails, so taking the wrong ABI shows. Not a driver: nothing else works. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef struct { int type; int id; } Loc;
typedef struct { int src_access_order; Loc src_hint; Loc dst_hint; unsigned flags; } Attrs;

/* What the last calls were given, read back by the test through ctypes. */
struct Seen {
  int proc_version; unsigned long long proc_flags; int batch_calls; size_t count;
  int order; unsigned flags; size_t num_attrs; size_t attr_index; void *stream;
  char image_head[32]; char function[64]; unsigned long long param0; void *launch_stream;
  unsigned grid[3], block[3];
};
struct Seen kvsched_fake_seen;

int cuInit(unsigned flags) { (void)flags; return 0; }
int cuDriverGetVersion(int *v) { *v = 13000; return 0; }
int cuGetErrorName(int e, const char **s) { static const char *n = "CUDA_ERROR_FAKE"; (void)e; *s = n; return 0; }
int cuGetErrorString(int e, const char **s) { static const char *n = "fake error"; (void)e; *s = n; return 0; }

static int batch_v12080(uint64_t *d, uint64_t *s, size_t *n, size_t count, Attrs *a, size_t *ai,
                        size_t na, size_t *fail, void *stream) {
  struct Seen *w = &kvsched_fake_seen;
  w->batch_calls++; w->count = count; w->order = a->src_access_order; w->flags = a->flags;
  w->num_attrs = na; w->attr_index = ai[0]; w->stream = stream;
  if (count == 3) { *fail = 1; return 700; }  /* the test's way to ask for a failure */
  for (size_t i = 0; i < count; ++i) memcpy((void *)(uintptr_t)d[i], (const void *)(uintptr_t)s[i], n[i]);
  return 0;
}
static int batch_v13000(uint64_t *d, uint64_t *s, size_t *n, size_t count, Attrs *a, size_t *ai,
                        size_t na, void *stream) {
  (void)d; (void)s; (void)n; (void)count; (void)a; (void)ai; (void)na; (void)stream;
  return 999;  /* the CUDA 13 prototype has no failIdx: calling it as 12.8 would be wrong */
}

int cuModuleLoadData(void **mod, const void *image) {
  strncpy(kvsched_fake_seen.image_head, (const char *)image, sizeof kvsched_fake_seen.image_head - 1);
  *mod = (void *)0xabc; return 0;
}
int cuModuleGetFunction(void **f, void *mod, const char *name) {
  (void)mod; strncpy(kvsched_fake_seen.function, name, sizeof kvsched_fake_seen.function - 1);
  *f = (void *)0xdef; return 0;
}
int cuModuleUnload(void *mod) { (void)mod; return 0; }
int cuLaunchKernel(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                   unsigned bz, unsigned shared, void *stream, void **params, void **extra) {
  struct Seen *w = &kvsched_fake_seen;
  (void)f; (void)shared; (void)extra;
  w->grid[0] = gx; w->grid[1] = gy; w->grid[2] = gz; w->block[0] = bx; w->block[1] = by; w->block[2] = bz;
  w->launch_stream = stream; w->param0 = *(unsigned long long *)params[0];
  return 0;
}

static int lookup(const char *sym, void **pfn, int version, unsigned long long flags, int *status);
int cuGetProcAddress_v2(const char *sym, void **pfn, int version, unsigned long long flags, int *status) {
  return lookup(sym, pfn, version, flags, status);
}
int cuGetProcAddress(const char *sym, void **pfn, int version, unsigned long long flags) {
  return lookup(sym, pfn, version, flags, NULL);
}

static int lookup(const char *sym, void **pfn, int version, unsigned long long flags, int *status) {
  static const struct { const char *name; void *fn; } table[] = {
    {"cuInit", (void *)cuInit}, {"cuDriverGetVersion", (void *)cuDriverGetVersion},
    {"cuGetErrorName", (void *)cuGetErrorName}, {"cuGetErrorString", (void *)cuGetErrorString},
    {"cuModuleLoadData", (void *)cuModuleLoadData}, {"cuModuleGetFunction", (void *)cuModuleGetFunction},
    {"cuModuleUnload", (void *)cuModuleUnload}, {"cuLaunchKernel", (void *)cuLaunchKernel},
    {"cuGetProcAddress", (void *)cuGetProcAddress_v2},
  };
  *pfn = NULL;
  if (!strcmp(sym, "cuMemcpyBatchAsync")) {
    kvsched_fake_seen.proc_version = version; kvsched_fake_seen.proc_flags = flags;
    *pfn = version >= 13000 ? (void *)batch_v13000 : version >= 12080 ? (void *)batch_v12080 : NULL;
  } else {
    for (size_t i = 0; i < sizeof table / sizeof table[0]; ++i)
      if (!strcmp(sym, table[i].name)) *pfn = table[i].fn;
  }
  if (status) *status = *pfn ? 0 : 1;
  return 0;
}
