// Python binding of the csrc/ kernels: `distil_kernels._C`.
//
// Only this file knows torch. It checks the tensors a caller hands over (device, dtype,
// shape, unit inner stride) and calls the torch-agnostic launchers. The CUDA stream
// comes from Python (`torch.cuda.current_stream().cuda_stream`), so the binding needs
// no c10/cuda headers and type-checks against any torch's headers (tests/csrc).

#include <torch/extension.h>

#include <cuda_runtime.h>

#include <optional>
#include <string>
#include <utility>

#include "loss_epilogue.h"
#include "row_epilogue.h"
#include "sampling_epilogue.h"

namespace {

void check_rows(const torch::Tensor& t, const char* name, int64_t rows, int64_t min_cols, torch::ScalarType dtype,
                const torch::Device& device) {
    TORCH_CHECK(t.device() == device, name, " must be on ", device, ", got ", t.device());
    TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", c10::toString(dtype), ", got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) >= min_cols, name, " must be [", rows, ", >=",
                min_cols, "], got ", t.sizes());
    TORCH_CHECK(t.stride(1) == 1, name, " must have unit column stride, got strides ", t.strides());
}

void check_vector(const torch::Tensor& t, const char* name, int64_t size, const torch::Device& device) {
    TORCH_CHECK(t.device() == device, name, " must be on ", device, ", got ", t.device());
    TORCH_CHECK(t.scalar_type() == torch::kFloat32, name, " must be float32, got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 1 && t.size(0) == size && t.is_contiguous(), name, " must be contiguous [", size,
                "], got ", t.sizes());
}

void check_launch(cudaError_t error, const char* what) {
    TORCH_CHECK(error == cudaSuccess, what, " failed: ", cudaGetErrorString(error));
}

// The kernels launch on the tensors' device, whatever the caller's current device (the
// stream handed over belongs to it; a launch on another device's stream fails).
class DeviceGuard {
  public:
    explicit DeviceGuard(const torch::Device& device) {
        check_launch(cudaGetDevice(&previous_), "cudaGetDevice");
        if (previous_ != device.index()) check_launch(cudaSetDevice(device.index()), "cudaSetDevice");
        target_ = device.index();
    }
    ~DeviceGuard() {
        if (previous_ != target_) cudaSetDevice(previous_);
    }
    DeviceGuard(const DeviceGuard&) = delete;
    DeviceGuard& operator=(const DeviceGuard&) = delete;

  private:
    int previous_ = 0;
    int target_ = 0;
};

// A chunk of fp32 logits [rows, cols] on a CUDA device, rows with unit column stride.
struct Chunk {
    torch::Device device;
    int64_t rows;
    int64_t cols;
};

Chunk check_chunk(const torch::Tensor& logits) {
    TORCH_CHECK(logits.is_cuda(), "logits must be a CUDA tensor, got ", logits.device());
    TORCH_CHECK(logits.dim() == 2, "logits must be [rows, cols], got ", logits.sizes());
    const Chunk chunk{logits.device(), logits.size(0), logits.size(1)};
    check_rows(logits, "logits", chunk.rows, chunk.cols, torch::kFloat32, chunk.device);
    TORCH_CHECK(chunk.rows <= INT32_MAX && chunk.cols <= INT32_MAX, "logits is too large: ", logits.sizes());
    return chunk;
}

distil::LogitsTransform check_transform(const std::optional<torch::Tensor>& bias, double softcap, double inv_temp,
                                        int64_t cols, const torch::Device& device) {
    if (bias) check_vector(*bias, "bias", cols, device);
    TORCH_CHECK(inv_temp > 0.0, "inv_temp must be > 0, got ", inv_temp);
    return {bias ? bias->data_ptr<float>() : nullptr, static_cast<float>(softcap), static_cast<float>(inv_temp)};
}

// ids [rows, slots] int64 and a per-slot fp32 companion of the same shape, both contiguous.
int64_t check_slots(const torch::Tensor& ids, const torch::Tensor& per_slot, const char* name, int64_t rows,
                    const torch::Device& device) {
    const int64_t slots = ids.dim() == 2 ? ids.size(1) : 0;
    check_rows(ids, "ids", rows, slots, torch::kInt64, device);
    TORCH_CHECK(ids.is_contiguous(), "ids must be contiguous");
    check_rows(per_slot, name, rows, slots, torch::kFloat32, device);
    TORCH_CHECK(per_slot.size(1) == slots && per_slot.is_contiguous(), name, " must be contiguous [", rows, ", ",
                slots, "], got ", per_slot.sizes());
    return slots;
}

void chunk_stats(torch::Tensor logits, std::optional<torch::Tensor> bias, double softcap, double inv_temp,
                 bool write_z, torch::Tensor ids, int64_t vocab_start, torch::Tensor slot_logits,
                 torch::Tensor partial, int64_t stream) {
    const auto [device, rows, cols] = check_chunk(logits);
    const DeviceGuard guard(device);
    const distil::LogitsTransform transform = check_transform(bias, softcap, inv_temp, cols, device);
    const int64_t slots = check_slots(ids, slot_logits, "slot_logits", rows, device);
    check_rows(partial, "partial", rows, 3, torch::kFloat32, device);
    TORCH_CHECK(partial.size(1) == 3 && partial.is_contiguous(), "partial must be contiguous [", rows, ", 3]");

    distil::ChunkStatsArgs args{};
    args.logits = logits.data_ptr<float>();
    args.ld = logits.stride(0);
    args.rows = static_cast<int>(rows);
    args.cols = static_cast<int>(cols);
    args.vocab_start = vocab_start;
    args.transform = transform;
    args.write_z = write_z;
    args.ids = ids.data_ptr<int64_t>();
    args.num_slots = static_cast<int>(slots);
    args.slot_logits = slot_logits.data_ptr<float>();
    args.partial = partial.data_ptr<float>();
    check_launch(distil::chunk_stats(args, reinterpret_cast<cudaStream_t>(stream)), "chunk_stats");
}

// The bytes a [rows, cols] tensor with unit column stride spans: [first, last).
std::pair<uintptr_t, uintptr_t> byte_range(const torch::Tensor& t) {
    const auto first = reinterpret_cast<uintptr_t>(t.data_ptr());
    if (t.size(0) == 0 || t.size(1) == 0) return {first, first};
    return {first, first + ((t.size(0) - 1) * t.stride(0) + t.size(1)) * t.element_size()};
}

void logits_grad(torch::Tensor logits, std::optional<torch::Tensor> bias, double softcap, double inv_temp,
                 torch::Tensor row_coef, torch::Tensor lse, std::optional<torch::Tensor> uniform, torch::Tensor ids,
                 torch::Tensor slot_coef, torch::Tensor slot_scratch, int64_t vocab_start, torch::Tensor out,
                 int64_t stream) {
    const auto [device, rows, cols] = check_chunk(logits);
    const DeviceGuard guard(device);
    const distil::LogitsTransform transform = check_transform(bias, softcap, inv_temp, cols, device);
    check_vector(row_coef, "row_coef", rows, device);
    check_vector(lse, "lse", rows, device);
    if (uniform) check_vector(*uniform, "uniform", rows, device);
    const int64_t slots = check_slots(ids, slot_coef, "slot_coef", rows, device);
    check_rows(slot_scratch, "slot_scratch", rows, slots, torch::kFloat32, device);
    TORCH_CHECK(slot_scratch.size(1) == slots && slot_scratch.is_contiguous(), "slot_scratch must be contiguous [",
                rows, ", ", slots, "], got ", slot_scratch.sizes());
    const auto type = out.scalar_type();
    TORCH_CHECK(type == torch::kBFloat16 || type == torch::kFloat16 || type == torch::kFloat32,
                "out must be bfloat16, float16 or float32, got ", type);
    check_rows(out, "out", rows, cols, type, device);
    const auto [logits_first, logits_last] = byte_range(logits);
    const auto [out_first, out_last] = byte_range(out.narrow(1, 0, cols));
    const bool in_place = out.data_ptr() == logits.data_ptr() &&
                          out.stride(0) * out.element_size() == logits.stride(0) * logits.element_size();
    TORCH_CHECK(in_place || out_last <= logits_first || logits_last <= out_first,
                "out must either overwrite logits row by row (the same first byte and row stride in bytes) or not "
                "overlap it");

    distil::LogitsGradArgs args{};
    args.logits = logits.data_ptr<float>();
    args.ld = logits.stride(0);
    args.rows = static_cast<int>(rows);
    args.cols = static_cast<int>(cols);
    args.vocab_start = vocab_start;
    args.transform = transform;
    args.row_coef = row_coef.data_ptr<float>();
    args.lse = lse.data_ptr<float>();
    args.uniform = uniform ? uniform->data_ptr<float>() : nullptr;
    args.ids = ids.data_ptr<int64_t>();
    args.slot_coef = slot_coef.data_ptr<float>();
    args.num_slots = static_cast<int>(slots);
    args.slot_scratch = slot_scratch.data_ptr<float>();
    args.out = out.data_ptr();
    args.ld_out = out.stride(0);
    args.out_type = type == torch::kBFloat16  ? distil::OutType::kBFloat16
                    : type == torch::kFloat16 ? distil::OutType::kFloat16
                                              : distil::OutType::kFloat32;
    check_launch(distil::logits_grad(args, reinterpret_cast<cudaStream_t>(stream)), "logits_grad");
}

int64_t row_epilogue_cluster(int64_t cols, int64_t num_slots) {
    if (cols <= 0 || cols > INT32_MAX || num_slots < 0 || num_slots > INT32_MAX) return 0;
    return distil::row_epilogue_plan(static_cast<int>(cols), static_cast<int>(num_slots)).cluster;
}

void row_epilogue(torch::Tensor logits, std::optional<torch::Tensor> bias, double softcap, double inv_temp,
                  torch::Tensor ids, torch::Tensor slot_weight, torch::Tensor slot_valid, torch::Tensor rest,
                  torch::Tensor upstream, int64_t num_target, double smoothing, double z_loss, double bucket_clamp,
                  torch::Tensor lse, torch::Tensor slot_logits, std::optional<torch::Tensor> logit_sum,
                  torch::Tensor out, int64_t stream) {
    const auto [device, rows, cols] = check_chunk(logits);
    const DeviceGuard guard(device);
    TORCH_CHECK(logits.stride(0) == cols, "logits must be contiguous whole rows [rows, V], got strides ",
                logits.strides());
    const distil::LogitsTransform transform = check_transform(bias, softcap, inv_temp, cols, device);
    const int64_t slots = check_slots(ids, slot_weight, "slot_weight", rows, device);
    check_rows(slot_valid, "slot_valid", rows, slots, torch::kBool, device);
    TORCH_CHECK(slot_valid.size(1) == slots && slot_valid.is_contiguous(), "slot_valid must be contiguous [", rows,
                ", ", slots, "], got ", slot_valid.sizes());
    check_slots(ids, slot_logits, "slot_logits", rows, device);
    check_vector(rest, "rest", rows, device);
    check_vector(upstream, "upstream", rows, device);
    check_vector(lse, "lse", rows, device);
    if (logit_sum) check_vector(*logit_sum, "logit_sum", rows, device);
    TORCH_CHECK(num_target >= 0 && num_target <= slots, "num_target must be in [0, ", slots, "], got ", num_target);
    const auto type = out.scalar_type();
    TORCH_CHECK(type == torch::kBFloat16 || type == torch::kFloat16 || type == torch::kFloat32,
                "out must be bfloat16, float16 or float32, got ", type);
    check_rows(out, "out", rows, cols, type, device);
    TORCH_CHECK(out.data_ptr() == logits.data_ptr() &&
                    out.stride(0) * out.element_size() == logits.stride(0) * logits.element_size(),
                "out must overwrite logits row by row (the same first byte and row stride in bytes)");
    TORCH_CHECK(row_epilogue_cluster(cols, slots) > 0, "a row of ", cols, " logits with ", slots,
                " slots does not fit a cluster's shared memory; use chunk_stats and logits_grad");

    distil::RowEpilogueArgs args{};
    args.logits = logits.data_ptr<float>();
    args.ld = logits.stride(0);
    args.rows = static_cast<int>(rows);
    args.cols = static_cast<int>(cols);
    args.transform = transform;
    args.ids = ids.data_ptr<int64_t>();
    args.slot_weight = slot_weight.data_ptr<float>();
    args.slot_valid = reinterpret_cast<const uint8_t*>(slot_valid.data_ptr<bool>());
    args.num_slots = static_cast<int>(slots);
    args.rest = rest.data_ptr<float>();
    args.upstream = upstream.data_ptr<float>();
    args.terms = {static_cast<int>(num_target), static_cast<float>(smoothing), static_cast<float>(z_loss),
                  static_cast<float>(1.0 / static_cast<double>(cols)), static_cast<float>(bucket_clamp)};
    args.lse = lse.data_ptr<float>();
    args.slot_logits = slot_logits.data_ptr<float>();
    args.logit_sum = logit_sum ? logit_sum->data_ptr<float>() : nullptr;
    args.out_type = type == torch::kBFloat16  ? distil::OutType::kBFloat16
                    : type == torch::kFloat16 ? distil::OutType::kFloat16
                                              : distil::OutType::kFloat32;
    check_launch(distil::row_epilogue(args, reinterpret_cast<cudaStream_t>(stream)), "row_epilogue");
}

distil::RowTopKArgs topk_args(const torch::Tensor& logits, int64_t vocab_start, int64_t k, double temperature,
                              torch::Tensor& values, torch::Tensor& ids, torch::Tensor& partial) {
    const auto [device, rows, cols] = check_chunk(logits);
    TORCH_CHECK(k >= 1 && k <= distil::kMaxTopK && k <= cols, "k must be in [1, min(cols, ", distil::kMaxTopK,
                ")], got ", k, " for ", cols, " columns");
    TORCH_CHECK(temperature > 0.0, "temperature must be > 0, got ", temperature);
    check_rows(values, "values", rows, k, torch::kFloat32, device);
    check_rows(ids, "ids", rows, k, torch::kInt64, device);
    check_rows(partial, "partial", rows, 4, torch::kFloat32, device);
    TORCH_CHECK(values.size(1) == k && values.is_contiguous() && ids.size(1) == k && ids.is_contiguous() &&
                    partial.size(1) == 4 && partial.is_contiguous(),
                "values and ids must be contiguous [rows, k], partial contiguous [rows, 4]");
    distil::RowTopKArgs args{};
    args.logits = logits.data_ptr<float>();
    args.ld = logits.stride(0);
    args.rows = static_cast<int>(rows);
    args.cols = static_cast<int>(cols);
    args.vocab_start = vocab_start;
    args.k = static_cast<int>(k);
    args.temperature = static_cast<float>(temperature);
    args.values = values.data_ptr<float>();
    args.ids = ids.data_ptr<int64_t>();
    args.partial = partial.data_ptr<float>();
    return args;
}

void row_topk(torch::Tensor logits, int64_t vocab_start, int64_t k, double temperature, torch::Tensor values,
              torch::Tensor ids, torch::Tensor partial, int64_t stream) {
    const distil::RowTopKArgs args = topk_args(logits, vocab_start, k, temperature, values, ids, partial);
    const DeviceGuard guard(logits.device());
    check_launch(distil::row_topk(args, reinterpret_cast<cudaStream_t>(stream)), "row_topk");
}

int64_t row_topk_one_pass_cluster(int64_t cols) {
    if (cols <= 0 || cols > INT32_MAX) return 0;
    return distil::row_topk_one_pass_cluster(static_cast<int>(cols));
}

void row_topk_one_pass(torch::Tensor logits, int64_t vocab_start, int64_t k, double temperature,
                       torch::Tensor values, torch::Tensor ids, torch::Tensor partial, int64_t stream) {
    const distil::RowTopKArgs args = topk_args(logits, vocab_start, k, temperature, values, ids, partial);
    const DeviceGuard guard(logits.device());
    TORCH_CHECK(row_topk_one_pass_cluster(args.cols) > 0, "rows of ", args.cols,
                " logits do not fit a cluster's shared memory; use row_topk");
    const torch::Tensor workspace =
        torch::empty({static_cast<int64_t>(distil::row_topk_one_pass_workspace_bytes(args.rows))},
                     torch::dtype(torch::kUInt8).device(logits.device()));
    check_launch(distil::row_topk_one_pass(args, workspace.data_ptr(), reinterpret_cast<cudaStream_t>(stream)),
                 "row_topk_one_pass");
}

void gumbel_argmax(torch::Tensor logits, int64_t vocab_start, double temperature, bool greedy, torch::Tensor k0,
                   torch::Tensor k1, torch::Tensor pos_lo, torch::Tensor pos_hi, torch::Tensor ids,
                   torch::Tensor scores, torch::Tensor logits_out, torch::Tensor partial, int64_t stream) {
    const auto [device, rows, cols] = check_chunk(logits);
    const DeviceGuard guard(device);
    TORCH_CHECK(cols >= 1, "logits must have at least one column, got ", logits.sizes());
    TORCH_CHECK(greedy || temperature > 0.0, "temperature must be > 0 unless greedy, got ", temperature);
    for (const auto* word : {&k0, &k1, &pos_lo, &pos_hi}) {
        TORCH_CHECK(word->device() == device && word->scalar_type() == torch::kInt64 && word->dim() == 1 &&
                        word->size(0) == rows && word->is_contiguous(),
                    "Philox key and position words must be contiguous int64 [", rows, "] on ", device);
    }
    const int64_t samples = ids.dim() == 2 ? ids.size(1) : 0;
    TORCH_CHECK(samples >= 1, "ids must be [rows, num_samples >= 1], got ", ids.sizes());
    check_rows(ids, "ids", rows, samples, torch::kInt64, device);
    check_rows(scores, "scores", rows, samples, torch::kFloat32, device);
    check_rows(logits_out, "logits_out", rows, samples, torch::kFloat32, device);
    check_rows(partial, "partial", rows, 4, torch::kFloat32, device);
    TORCH_CHECK(ids.is_contiguous() && scores.is_contiguous() && logits_out.is_contiguous() &&
                    scores.size(1) == samples && logits_out.size(1) == samples && partial.size(1) == 4 &&
                    partial.is_contiguous(),
                "ids, scores and logits_out must be contiguous [rows, num_samples], partial [rows, 4]");
    distil::GumbelArgmaxArgs args{};
    args.logits = logits.data_ptr<float>();
    args.ld = logits.stride(0);
    args.rows = static_cast<int>(rows);
    args.cols = static_cast<int>(cols);
    args.vocab_start = vocab_start;
    args.temperature = static_cast<float>(temperature);
    args.greedy = greedy;
    args.k0 = k0.data_ptr<int64_t>();
    args.k1 = k1.data_ptr<int64_t>();
    args.pos_lo = pos_lo.data_ptr<int64_t>();
    args.pos_hi = pos_hi.data_ptr<int64_t>();
    args.num_samples = static_cast<int>(samples);
    args.ids = ids.data_ptr<int64_t>();
    args.scores = scores.data_ptr<float>();
    args.logits_out = logits_out.data_ptr<float>();
    args.partial = partial.data_ptr<float>();
    const size_t scratch = distil::gumbel_argmax_workspace_bytes(args.rows, vocab_start, args.cols);
    const torch::Tensor workspace =
        torch::empty({static_cast<int64_t>(scratch)}, torch::dtype(torch::kUInt8).device(device));
    args.workspace = workspace.data_ptr();
    check_launch(distil::gumbel_argmax(args, reinterpret_cast<cudaStream_t>(stream)), "gumbel_argmax");
}

}  // namespace

// setup.py passes the digest of csrc/ as a bare token (h + 16 hex digits), which needs no
// quoting through setuptools and nvcc; distil_kernels.cuda_ext compares it with the sources.
#define DISTIL_KERNELS_STRINGIFY_(x) #x
#define DISTIL_KERNELS_STRINGIFY(x) DISTIL_KERNELS_STRINGIFY_(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "distil-kernels CUDA kernels (csrc/): the cuda backend's loss and sampling epilogues";
#ifdef DISTIL_KERNELS_SOURCE_HASH
    m.attr("source_hash") = std::string(DISTIL_KERNELS_STRINGIFY(DISTIL_KERNELS_SOURCE_HASH)).substr(1);
#endif
    m.def("chunk_stats", &chunk_stats, "per-row (max, sum exp, sum z) of z = softcap(u + b) / T; slot logits",
          py::arg("logits"), py::arg("bias"), py::arg("softcap"), py::arg("inv_temp"), py::arg("write_z"),
          py::arg("ids"), py::arg("vocab_start"), py::arg("slot_logits"), py::arg("partial"), py::arg("stream"));
    m.def("logits_grad", &logits_grad, "dL/du of a chunk of u into `out` (bf16, fp16 or fp32), in place or not",
          py::arg("logits"), py::arg("bias"), py::arg("softcap"), py::arg("inv_temp"), py::arg("row_coef"),
          py::arg("lse"), py::arg("uniform"), py::arg("ids"), py::arg("slot_coef"), py::arg("slot_scratch"),
          py::arg("vocab_start"), py::arg("out"), py::arg("stream"));
    m.def("row_epilogue_cluster", &row_epilogue_cluster,
          "blocks of row_epilogue's cluster for whole rows of `cols` logits and `num_slots` slots (0: no fit)",
          py::arg("cols"), py::arg("num_slots"));
    m.def("row_epilogue", &row_epilogue,
          "one pass over whole rows (sm_90 clusters): lse, slot logits, logit sums and dL/du over the logits",
          py::arg("logits"), py::arg("bias"), py::arg("softcap"), py::arg("inv_temp"), py::arg("ids"),
          py::arg("slot_weight"), py::arg("slot_valid"), py::arg("rest"), py::arg("upstream"), py::arg("num_target"),
          py::arg("smoothing"), py::arg("z_loss"), py::arg("bucket_clamp"), py::arg("lse"), py::arg("slot_logits"),
          py::arg("logit_sum"), py::arg("out"), py::arg("stream"));
    m.def("row_topk", &row_topk, "the k largest logits of each row, (value desc, id asc); lse terms",
          py::arg("logits"), py::arg("vocab_start"), py::arg("k"), py::arg("temperature"), py::arg("values"),
          py::arg("ids"), py::arg("partial"), py::arg("stream"));
    m.def("row_topk_one_pass_cluster", &row_topk_one_pass_cluster,
          "blocks of row_topk_one_pass's cluster for rows of `cols` logits (0: too wide)", py::arg("cols"));
    m.def("row_topk_one_pass", &row_topk_one_pass, "row_topk in one read of each row (sm_90 thread-block clusters)",
          py::arg("logits"), py::arg("vocab_start"), py::arg("k"), py::arg("temperature"), py::arg("values"),
          py::arg("ids"), py::arg("partial"), py::arg("stream"));
    m.def("gumbel_argmax", &gumbel_argmax, "Gumbel-max draws on the shared Philox stream; lse terms",
          py::arg("logits"), py::arg("vocab_start"), py::arg("temperature"), py::arg("greedy"), py::arg("k0"),
          py::arg("k1"), py::arg("pos_lo"), py::arg("pos_hi"), py::arg("ids"), py::arg("scores"),
          py::arg("logits_out"), py::arg("partial"), py::arg("stream"));
}
