// Autocast: the cnnext ops under torch.autocast, registered for the AutocastCPU and
// AutocastCUDA dispatch keys as torch registers their namesakes (aten/src/ATen/autocast_mode.cpp).
//
//   conv2d, conv_transpose2d      lower_precision_fp: every floating (not float64) tensor
//                                 argument cast to the autocast dtype (bfloat16 by default
//                                 on the CPU, float16 on CUDA), as aten::conv2d and
//                                 aten::conv_transpose2d.input.
//   conv_bn_relu2d_train / _eval  the convolution's input, weight and bias cast as conv2d;
//                                 bn_weight, bn_bias and the running statistics left as
//                                 they are (float32 parameters, as stock BatchNorm2d keeps
//                                 them under autocast: its batch_norm takes half input with
//                                 float32 parameters); the batch statistics are float32
//                                 (stats_dtype) and so are the running statistics'
//                                 updates.
//   every other op                fallthrough (torch's default for the autocast keys):
//                                 pooling and unpooling run in their input's dtype, as
//                                 aten's pooling ops do; the backward ops run in the dtypes
//                                 autograd hands them.
//
// Each wrapper casts with at::autocast::cached_cast (torch's cast cache: a float32 weight
// is cast once per autocast region), then calls the op again below the autocast key, so
// the Autograd key records the casts and the gradients flow back to the float32 leaves.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>

namespace cnnext {
namespace {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;
using Ints = c10::IntArrayRef;

template <typename Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// Below the autocast key of device type D, with D's autocast dtype.
template <c10::DeviceType D>
struct Region {
  c10::impl::ExcludeDispatchKeyGuard guard{at::autocast::get_autocast_dispatch_key_from_device_type(D)};
  at::ScalarType dtype = at::autocast::get_autocast_dtype(D);
  Tensor cast(const Tensor& t) const { return at::autocast::cached_cast(dtype, t, D); }
  OptTensor cast(const OptTensor& t) const { return at::autocast::cached_cast(dtype, t, D); }
};

template <c10::DeviceType D>
Tensor conv2d(const Tensor& input, const Tensor& weight, const OptTensor& bias, Ints stride,
              Ints padding, Ints dilation, int64_t groups) {
  static const auto op = handle<Tensor(const Tensor&, const Tensor&, const OptTensor&, Ints, Ints,
                                       Ints, int64_t)>("cnnext::conv2d");
  const Region<D> r;
  return op.call(r.cast(input), r.cast(weight), r.cast(bias), stride, padding, dilation, groups);
}

template <c10::DeviceType D>
Tensor conv_transpose2d(const Tensor& input, const Tensor& weight, const OptTensor& bias,
                        Ints stride, Ints padding, Ints output_padding, int64_t groups,
                        Ints dilation) {
  static const auto op = handle<Tensor(const Tensor&, const Tensor&, const OptTensor&, Ints, Ints,
                                       Ints, int64_t, Ints)>("cnnext::conv_transpose2d");
  const Region<D> r;
  return op.call(r.cast(input), r.cast(weight), r.cast(bias), stride, padding, output_padding,
                 groups, dilation);
}

template <c10::DeviceType D>
std::tuple<Tensor, Tensor, Tensor, Tensor> conv_bn_relu2d_train(
    const Tensor& input, const Tensor& weight, const OptTensor& bias, const OptTensor& bn_weight,
    const OptTensor& bn_bias, double eps, Ints stride, Ints padding, Ints dilation,
    int64_t groups, bool relu) {
  static const auto op =
      handle<std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&,
                                                        const OptTensor&, const OptTensor&,
                                                        const OptTensor&, double, Ints, Ints,
                                                        Ints, int64_t, bool)>(
          "cnnext::conv_bn_relu2d_train");
  const Region<D> r;
  return op.call(r.cast(input), r.cast(weight), r.cast(bias), bn_weight, bn_bias, eps, stride,
                 padding, dilation, groups, relu);
}

template <c10::DeviceType D>
Tensor conv_bn_relu2d_eval(const Tensor& input, const Tensor& weight, const OptTensor& bias,
                           const OptTensor& bn_weight, const OptTensor& bn_bias,
                           const Tensor& running_mean, const Tensor& running_var, double eps,
                           Ints stride, Ints padding, Ints dilation, int64_t groups, bool relu) {
  static const auto op =
      handle<Tensor(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                    const OptTensor&, const Tensor&, const Tensor&, double, Ints, Ints, Ints,
                    int64_t, bool)>("cnnext::conv_bn_relu2d_eval");
  const Region<D> r;
  return op.call(r.cast(input), r.cast(weight), r.cast(bias), bn_weight, bn_bias, running_mean,
                 running_var, eps, stride, padding, dilation, groups, relu);
}

template <c10::DeviceType D>
void impls(torch::Library& m) {
  m.impl("conv2d", &conv2d<D>);
  m.impl("conv_transpose2d", &conv_transpose2d<D>);
  m.impl("conv_bn_relu2d_train", &conv_bn_relu2d_train<D>);
  m.impl("conv_bn_relu2d_eval", &conv_bn_relu2d_eval<D>);
}

}  // namespace

TORCH_LIBRARY_IMPL(cnnext, AutocastCPU, m) { impls<c10::DeviceType::CPU>(m); }
TORCH_LIBRARY_IMPL(cnnext, AutocastCUDA, m) { impls<c10::DeviceType::CUDA>(m); }

}  // namespace cnnext
