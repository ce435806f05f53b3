// max_unpool2d on the CPU: the scatter of input into a zero output at the indices (one
// plane per thread, in input order: with repeated indices the last one wins;
// channels_last: one sample per thread) and its backward, a gather (max_pool2d_gather,
// csrc/cpu/max_pool2d_backward.cpp). Every index is checked before it is used.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "cpu/max_pool2d.h"
#include "cpu/max_pool2d_common.h"
#include "cpu/output_alloc.h"
#include "paths.h"
#include "tensors.h"

namespace cnnext {
namespace cpu {
namespace {

CNNEXT_PATH(kUnpoolChannelsLast, "max_unpool2d.fwd.channels_last");
CNNEXT_PATH(kUnpoolFlat, "max_unpool2d.fwd.flat_scatter");
CNNEXT_PATH(kUnpoolStrided, "max_unpool2d.fwd.strided_scatter");

}  // namespace

at::Tensor max_unpool2d_backward(const at::Tensor& grad_output, const at::Tensor& indices,
                                 at::MemoryFormat out_format) {
  return max_pool2d_gather("max_unpool2d_backward", grad_output, indices, nullptr, out_format);
}

at::Tensor max_unpool2d_forward(const at::Tensor& input, const at::Tensor& indices, int64_t OH,
                                int64_t OW, at::MemoryFormat out_format) {
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  at::Tensor out = empty_output({N, C, OH, OW}, input.options().memory_format(out_format)).zero_();
  if (out.numel() == 0 || input.numel() == 0) return out;
  const int64_t OHW = OH * OW;
  BadIndex bad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cnnext_max_unpool2d", [&] {
    const scalar_t* xp = input.const_data_ptr<scalar_t>();
    const int64_t* ip = indices.const_data_ptr<int64_t>();
    scalar_t* yp = out.mutable_data_ptr<scalar_t>();
    const Strides4 xs = strides_of(input), is = strides_of(indices), ys = strides_of(out);
    // One plane per thread, in input order: with repeated indices the last one wins.
    if (ys.c == 1 && C > 1) {
      kUnpoolChannelsLast.hit();
      // channels_last: one sample per thread, input pixels in order, channels inside
      // (each plane is still written in input order).
      at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
          const scalar_t* xpp = xp + n * xs.n;
          const int64_t* ipp = ip + n * is.n;
          scalar_t* ypp = yp + n * ys.n;
          for (int64_t h = 0; h < H; ++h)
            for (int64_t w = 0; w < W; ++w) {
              const scalar_t* xpx = xpp + h * xs.h + w * xs.w;
              const int64_t* ipx = ipp + h * is.h + w * is.w;
              for (int64_t c = 0; c < C; ++c) {
                const int64_t i = ipx[c * is.c];
                if (i < 0 || i >= OHW) {
                  bad.record(i);
                  continue;
                }
                ypp[i * ys.w + c] = xpx[c * xs.c];
              }
            }
        }
      });
      return;
    }
    const bool flat = ys.w == 1 && xs.w == 1 && xs.h == W && is.w == 1 && is.h == W;
    (flat ? kUnpoolFlat : kUnpoolStrided).hit();
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / C, c = plane % C;
        const scalar_t* xpp = xp + n * xs.n + c * xs.c;
        const int64_t* ipp = ip + n * is.n + c * is.c;
        scalar_t* ypp = yp + n * ys.n + c * ys.c;
        if (flat) {  // dense planes: one flat loop, the index checked as unsigned
          const int64_t HW = H * W;
          for (int64_t k = 0; k < HW; ++k) {
            const int64_t i = ipp[k];
            if (static_cast<uint64_t>(i) >= static_cast<uint64_t>(OHW)) {
              bad.record(i);
              continue;
            }
            ypp[i] = xpp[k];
          }
          continue;
        }
        for (int64_t h = 0; h < H; ++h)
          for (int64_t w = 0; w < W; ++w) {
            const int64_t i = ipp[h * is.h + w * is.w];
            if (i < 0 || i >= OHW) {
              bad.record(i);
              continue;
            }
            ypp[i * ys.w] = xpp[h * xs.h + w * xs.w];
          }
      }
    });
  });
  bad.check("max_unpool2d", OH, OW);
  return out;
}

}  // namespace cpu
}  // namespace cnnext
