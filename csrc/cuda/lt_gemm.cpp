// cuBLASLt GEMMs with epilogues: see lt_gemm.h.
#include "lt_gemm.h"

#include <cublasLt.h>

#include <memory>
#include <tuple>
#include <unordered_map>

#include "cuda_check.h"

namespace fastnn {
namespace cuda {

namespace {

cudaDataType_t cuda_type(DType d) {
  switch (d) {
    case DType::kFloat32: return CUDA_R_32F;
    case DType::kFloat16: return CUDA_R_16F;
    case DType::kBFloat16: return CUDA_R_16BF;
    default: throw std::invalid_argument("fastnn cuBLASLt: float32, float16 and bfloat16 only");
  }
}

cublasLtEpilogue_t lt_epilogue(Epilogue e) {
  switch (e) {
    case Epilogue::kNone: return CUBLASLT_EPILOGUE_DEFAULT;
    case Epilogue::kBias: return CUBLASLT_EPILOGUE_BIAS;
    case Epilogue::kReluBias: return CUBLASLT_EPILOGUE_RELU_BIAS;
    case Epilogue::kReluAuxBias: return CUBLASLT_EPILOGUE_RELU_AUX_BIAS;
    case Epilogue::kGeluBias: return CUBLASLT_EPILOGUE_GELU_BIAS;
    case Epilogue::kGeluAuxBias: return CUBLASLT_EPILOGUE_GELU_AUX_BIAS;
    case Epilogue::kDReluBgrad: return CUBLASLT_EPILOGUE_DRELU_BGRAD;
    case Epilogue::kDGeluBgrad: return CUBLASLT_EPILOGUE_DGELU_BGRAD;
    case Epilogue::kBgradB: return CUBLASLT_EPILOGUE_BGRADB;
    case Epilogue::kRelu: return CUBLASLT_EPILOGUE_RELU;
    case Epilogue::kReluAux: return CUBLASLT_EPILOGUE_RELU_AUX;
    case Epilogue::kGelu: return CUBLASLT_EPILOGUE_GELU;
    case Epilogue::kGeluAux: return CUBLASLT_EPILOGUE_GELU_AUX;
  }
  throw std::invalid_argument("fastnn cuBLASLt: unknown epilogue");
}

bool uses_aux(Epilogue e) {
  return e == Epilogue::kReluAuxBias || e == Epilogue::kGeluAuxBias || e == Epilogue::kDReluBgrad ||
         e == Epilogue::kDGeluBgrad || e == Epilogue::kReluAux || e == Epilogue::kGeluAux;
}

// The forward epilogues that add a bias.
bool adds_bias(Epilogue e) {
  return e == Epilogue::kBias || e == Epilogue::kReluBias || e == Epilogue::kReluAuxBias ||
         e == Epilogue::kGeluBias || e == Epilogue::kGeluAuxBias;
}
Epilogue without_bias(Epilogue e) {
  switch (e) {
    case Epilogue::kBias: return Epilogue::kNone;
    case Epilogue::kReluBias: return Epilogue::kRelu;
    case Epilogue::kReluAuxBias: return Epilogue::kReluAux;
    case Epilogue::kGeluBias: return Epilogue::kGelu;
    case Epilogue::kGeluAuxBias: return Epilogue::kGeluAux;
    default: return e;
  }
}
// 16-bit outputs take the bias as the C matrix (leading dimension 0: the same [N] vector for
// every row, beta = 1), which cuBLASLt adds in float32 before the epilogue and the one rounding.
// Its bias epilogue can add in the output type (PyTorch traced that to split-K algorithms,
// pytorch/pytorch#180875): seen on an H200 as relu masks and gelu_tanh outputs that disagree with
// the exact z, at shapes from 1 x 9 -> 1 to 1000 x 1000 -> 127 (tests/test_cuda.py).
bool bias_as_c(const GemmArgs& g) { return g.dtype != DType::kFloat32 && adds_bias(g.epilogue); }
bool uses_bias_grad(Epilogue e) {
  return e == Epilogue::kDReluBgrad || e == Epilogue::kDGeluBgrad || e == Epilogue::kBgradB;
}

// Largest power of two (up to 256) dividing the address and every leading-dimension stride.
int alignment(const void* p, int64_t ld_bytes) {
  const uintptr_t v = reinterpret_cast<uintptr_t>(p) | static_cast<uintptr_t>(ld_bytes) | 256u;
  return static_cast<int>(v & (~v + 1));
}

// Everything the plan depends on except the data pointers. cuBLASLt's heuristic reads the bias and
// aux pointers for their alignment (cublasLt.h, CUBLASLT_MATMUL_DESC_BIAS_POINTER), so their
// alignments are part of the key like A's, B's and D's. Compared and hashed field by field.
struct PlanKey {
  int device, dtype, epilogue;
  bool tf32, trans_a, trans_b, accumulate;
  int64_t m, n, k, lda, ldb, ldd, aux_ld;
  int align_a, align_b, align_d, align_bias, align_aux;
  size_t workspace;
  auto fields() const {
    return std::tie(device, dtype, epilogue, tf32, trans_a, trans_b, accumulate, m, n, k, lda, ldb, ldd, aux_ld,
                    align_a, align_b, align_d, align_bias, align_aux, workspace);
  }
  bool operator==(const PlanKey& o) const { return fields() == o.fields(); }
};

struct PlanKeyHash {
  size_t operator()(const PlanKey& k) const {
    size_t h = 1469598103934665603ull;
    auto mix = [&h](int64_t v) { h = (h ^ static_cast<size_t>(v)) * 1099511628211ull; };
    std::apply([&mix](auto... v) { (mix(static_cast<int64_t>(v)), ...); }, k.fields());
    return h;
  }
};

// Plans kept per thread. Dynamic shapes make one plan per distinct M; past this many the cache
// starts over (a new plan costs one heuristic query, tens of microseconds).
constexpr size_t kMaxPlans = 1024;

// A matmul descriptor, layouts and the heuristic's algorithm; pointers are set per call.
struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr, d = nullptr;  // c: the bias as C, else d
  cublasLtMatmulAlgo_t algo{};
  bool supported = false;
  ~Plan() {
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (desc) cublasLtMatmulDescDestroy(desc);
  }
};

// Per thread, so that setting a cached descriptor's pointers never races another thread.
struct ThreadCache {
  std::unordered_map<int, cublasLtHandle_t> handles;
  std::unordered_map<PlanKey, std::unique_ptr<Plan>, PlanKeyHash> plans;
};

ThreadCache& cache() {
  // Deliberately leaked: destroying cuBLAS state during interpreter exit, after the CUDA context
  // may be gone, can crash.
  thread_local ThreadCache* c = new ThreadCache();
  return *c;
}

cublasLtHandle_t handle_for(int device) {
  auto& handles = cache().handles;
  auto it = handles.find(device);
  if (it != handles.end()) return it->second;
  cublasLtHandle_t h;
  FASTNN_CUBLAS_CHECK(cublasLtCreate(&h));
  handles.emplace(device, h);
  return h;
}

template <typename T>
void set_attr(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr, const T& value) {
  FASTNN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, attr, &value, sizeof(value)));
}

std::unique_ptr<Plan> make_plan(const GemmArgs& g, const PlanKey& key, cublasLtHandle_t handle) {
  auto plan = std::make_unique<Plan>();
  const cudaDataType_t t = cuda_type(g.dtype);
  const cublasComputeType_t compute =
      g.dtype == DType::kFloat32 && g.allow_tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  FASTNN_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan->desc, compute, CUDA_R_32F));
  // Column-major view: D^T[N, M] = op(B)^T[N, K] @ op(A)^T[K, M]; cuBLAS's "A" is our B.
  const cublasOperation_t op_lt_a = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_lt_b = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  set_attr(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, op_lt_a);
  set_attr(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, op_lt_b);
  const Epilogue epilogue = bias_as_c(g) ? without_bias(g.epilogue) : g.epilogue;
  set_attr(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, lt_epilogue(epilogue));
  if (uses_aux(epilogue)) set_attr(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, g.aux_ld);
  // layouts: rows x cols of the stored column-major matrices
  const uint64_t la_rows = g.trans_b ? g.k : g.n, la_cols = g.trans_b ? g.n : g.k;
  const uint64_t lb_rows = g.trans_a ? g.m : g.k, lb_cols = g.trans_a ? g.k : g.m;
  FASTNN_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->a, t, la_rows, la_cols, g.ldb));
  FASTNN_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->b, t, lb_rows, lb_cols, g.lda));
  FASTNN_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->d, t, g.n, g.m, g.ldd));
  if (bias_as_c(g) && cublasLtMatrixLayoutCreate(&plan->c, t, g.n, g.m, 0) != CUBLAS_STATUS_SUCCESS) {
    plan->c = nullptr;
    return plan;  // unsupported: the caller's own path
  }

  cublasLtMatmulPreference_t pref;
  FASTNN_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t ws = g.workspace_bytes;
  const uint32_t align_a = key.align_b, align_b = key.align_a, align_d = key.align_d;
  const uint32_t align_c = plan->c ? key.align_bias : align_d;
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a, sizeof(align_a));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b, sizeof(align_b));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_c, sizeof(align_c));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_d, sizeof(align_d));
  // Split-K partial sums stay in float32: the default also allows partials rounded to a 16-bit
  // output type (INPLACE, OUTPUT_TYPE), several roundings per element instead of one.
  const uint32_t reductions = g.dtype == DType::kFloat32 ? CUBLASLT_REDUCTION_SCHEME_MASK
                                                         : CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &reductions,
                                       sizeof(reductions));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  // The pointers in the descriptor matter to the heuristic only through alignment: set them so
  // that epilogues needing a bias or aux are judged with them present.
  if (g.bias && !plan->c) set_attr(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, g.bias);
  if (g.bias_grad) set_attr(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, g.bias_grad);
  if (g.aux) set_attr(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, g.aux);
  const cublasLtMatrixLayout_t c = plan->c ? plan->c : plan->d;
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(handle, plan->desc, plan->a, plan->b, c, plan->d,
                                                           pref, 1, &result, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  // Any refusal here (NOT_SUPPORTED, or INVALID_VALUE for an epilogue/layout combination some
  // cuBLASLt versions reject at this step) means "no algorithm": the caller takes its own path,
  // and a plain GEMM that cuBLASLt really cannot run fails loudly there.
  if (st != CUBLAS_STATUS_SUCCESS || found == 0) {
    plan->supported = false;
    return plan;
  }
  plan->algo = result.algo;
  plan->supported = true;
  return plan;
}

}  // namespace

bool lt_gemm(const GemmArgs& g) {
  if (g.m < 0 || g.n < 0 || g.k < 0) throw std::invalid_argument("fastnn cuBLASLt: negative size");
  if (uses_aux(g.epilogue) && !g.aux) throw std::invalid_argument("fastnn cuBLASLt: this epilogue needs aux");
  if (uses_bias_grad(g.epilogue) && !g.bias_grad)
    throw std::invalid_argument("fastnn cuBLASLt: this epilogue needs bias_grad");
  if (adds_bias(g.epilogue) && !g.bias)
    throw std::invalid_argument("fastnn cuBLASLt: this epilogue needs a bias (use the epilogue without _BIAS)");
  if (g.accumulate && adds_bias(g.epilogue))
    throw std::invalid_argument("fastnn cuBLASLt: accumulate and a bias epilogue together");
  // Nothing to launch. An empty D whose bias gradient is still wanted (BGRADB with no columns: the
  // sums over the reduction do not depend on them) and an empty reduction (k == 0) are the
  // caller's to fill: false.
  if (g.m == 0 || g.n == 0) return !(uses_bias_grad(g.epilogue) && g.m > 0);
  if (g.k == 0) return false;

  FASTNN_CUDA_CHECK(cudaSetDevice(g.device));
  cublasLtHandle_t handle = handle_for(g.device);
  const size_t es = dtype_size(g.dtype);
  PlanKey key;
  key.device = g.device;
  key.dtype = static_cast<int>(g.dtype);
  key.epilogue = static_cast<int>(g.epilogue);
  key.tf32 = g.allow_tf32;
  key.trans_a = g.trans_a;
  key.trans_b = g.trans_b;
  key.accumulate = g.accumulate;
  key.m = g.m, key.n = g.n, key.k = g.k, key.lda = g.lda, key.ldb = g.ldb, key.ldd = g.ldd;
  key.aux_ld = uses_aux(g.epilogue) ? g.aux_ld : 0;
  key.align_a = alignment(g.a, g.lda * static_cast<int64_t>(es));
  key.align_b = alignment(g.b, g.ldb * static_cast<int64_t>(es));
  key.align_d = alignment(g.d, g.ldd * static_cast<int64_t>(es));
  const void* bias_ptr = g.bias ? g.bias : g.bias_grad;
  key.align_bias = bias_ptr ? alignment(bias_ptr, 0) : 0;
  key.align_aux = uses_aux(g.epilogue) ? alignment(g.aux, g.aux_ld * static_cast<int64_t>(es)) : 0;
  key.workspace = g.workspace_bytes;

  auto& plans = cache().plans;
  auto it = plans.find(key);
  if (it == plans.end()) {
    if (plans.size() >= kMaxPlans) plans.clear();
    it = plans.emplace(key, make_plan(g, key, handle)).first;
  }
  Plan& plan = *it->second;
  if (!plan.supported) return false;

  if (g.bias && !plan.c) set_attr(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, g.bias);
  if (g.bias_grad) set_attr(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, g.bias_grad);
  if (g.aux) set_attr(plan.desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, g.aux);
  const float alpha = 1.0f, beta = g.accumulate || plan.c ? 1.0f : 0.0f;
  const void* c = plan.c ? g.bias : g.d;
  const cublasStatus_t st = cublasLtMatmul(handle, plan.desc, &alpha, g.b, plan.a, g.a, plan.b, &beta, c,
                                           plan.c ? plan.c : plan.d, g.d, plan.d, &plan.algo, g.workspace,
                                           g.workspace_bytes, g.stream);
  // A refusal at run time (the algorithm does not take these pointers after all) launches nothing:
  // the caller takes its own path, as for a refusal by the heuristic.
  if (st == CUBLAS_STATUS_NOT_SUPPORTED || st == CUBLAS_STATUS_INVALID_VALUE) return false;
  FASTNN_CUBLAS_CHECK(st);
  return true;
}

size_t plan_cache_size() { return cache().plans.size(); }

size_t plan_cache_limit() { return kMaxPlans; }

size_t cublaslt_version() { return cublasLtGetVersion(); }

}  // namespace cuda
}  // namespace fastnn
