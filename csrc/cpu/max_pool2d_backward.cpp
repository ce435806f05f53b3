// max_pool2d backward on the CPU: the scatter of grad_output into grad_input
// (max_pool2d_with_indices_backward) and the gathers (max_pool2d_select, and
// max_unpool2d_backward through max_pool2d_gather).
//
// Backward scatters grad_output into grad_input plane by plane, each plane by one
// thread, in output order (dense planes: one flat loop; float16 / bfloat16 dense planes
// sum in float and round once): deterministic (channels_last:
// one sample per thread, pixels in output order, channels inside). The gathers are one
// loop through the strides. Every index read from a tensor is checked against its plane
// before it is used.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/max_pool2d.h"
#include "cpu/max_pool2d_common.h"
#include "cpu/vec.h"
#include "paths.h"
#include "tensors.h"

namespace cnnext {
namespace cpu {
namespace {

CNNEXT_PATH(kBwdChannelsLast, "max_pool2d.bwd.channels_last");
CNNEXT_PATH(kBwdFlat, "max_pool2d.bwd.flat_scatter");
CNNEXT_PATH(kBwdStrided, "max_pool2d.bwd.strided_scatter");
CNNEXT_PATH(kGatherCl, "max_pool2d.gather.channels_last");
CNNEXT_PATH(kGatherPlanes, "max_pool2d.gather.planes");

}  // namespace

at::Tensor max_pool2d_backward(const at::Tensor& grad_output, const at::Tensor& indices,
                               const Pool2dParams& p, at::MemoryFormat out_format) {
  at::Tensor gx = at::empty({p.N, p.C, p.H, p.W}, grad_output.options().memory_format(out_format)).zero_();
  if (gx.numel() == 0 || grad_output.numel() == 0) return gx;
  const EmptyWindows empty(p);
  BadIndex bad;
  const int64_t HW = p.H * p.W;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(), "cnnext_max_pool2d_backward", [&] {
    const scalar_t* g = grad_output.const_data_ptr<scalar_t>();
    const int64_t* ip = indices.const_data_ptr<int64_t>();
    scalar_t* dx = gx.mutable_data_ptr<scalar_t>();
    const Strides4 gs = strides_of(grad_output), is = strides_of(indices), xs = strides_of(gx);
    // gx is allocated dense: flat plane index i is at i * xs.w.
    if (xs.c == 1 && p.C > 1) {
      kBwdChannelsLast.hit();
      // channels_last: one sample per thread, output pixels in order, channels inside
      // (each plane still receives its grads in output order: the same sums).
      const bool unit = gs.c == 1 && is.c == 1 && xs.w == p.C;
      const int64_t C = p.C;
      at::parallel_for(0, p.N, 1, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
          const scalar_t* gp = g + n * gs.n;
          const int64_t* ipp = ip + n * is.n;
          scalar_t* xp = dx + n * xs.n;
          for (int64_t oh = 0; oh < p.OH; ++oh) {
            if (empty.row_empty[oh]) continue;
            for (int64_t ow = 0; ow < p.OW; ++ow) {
              if (empty.col_empty[ow]) continue;
              const scalar_t* __restrict__ gpx = gp + oh * gs.h + ow * gs.w;
              const int64_t* __restrict__ ipx = ipp + oh * is.h + ow * is.w;
              if (unit) {  // channels contiguous in grad_output and indices
                const uint64_t hw = static_cast<uint64_t>(HW);
                for (int64_t c = 0; c < p.C; ++c) {
                  const int64_t i = ipx[c];
                  if (static_cast<uint64_t>(i) >= hw) {
                    bad.record(i);
                    continue;
                  }
                  xp[i * C + c] += gpx[c];
                }
                continue;
              }
              for (int64_t c = 0; c < p.C; ++c) {
                const int64_t i = ipx[c * is.c];
                if (i < 0 || i >= HW) {
                  bad.record(i);
                  continue;
                }
                xp[i * xs.w + c] += gpx[c * gs.c];
              }
            }
          }
        }
      });
      return;
    }
    bool any_empty = empty.any_col;
    for (int64_t oh = 0; oh < p.OH; ++oh) any_empty |= empty.row_empty[oh] != 0;
    const bool flat = !any_empty && xs.w == 1 && gs.w == 1 && gs.h == p.OW && is.w == 1 &&
                      is.h == p.OW;
    (flat ? kBwdFlat : kBwdStrided).hit();
    constexpr bool kHalf = std::is_same_v<scalar_t, at::BFloat16> || std::is_same_v<scalar_t, at::Half>;
    at::parallel_for(0, p.N * p.C, 1, [&](int64_t begin, int64_t end) {
      // float16 / bfloat16 dense planes: the sums in a float plane, rounded once (the
      // half type's read-add-round per tap was most of the time; where windows do not
      // overlap the result is the same, one value per input).
      std::vector<float> acc(kHalf && flat ? HW : 0);
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / p.C, c = plane % p.C;
        const scalar_t* gp = g + n * gs.n + c * gs.c;
        const int64_t* ipp = ip + n * is.n + c * is.c;
        scalar_t* xp = dx + n * xs.n + c * xs.c;
        if (kHalf && flat) {
          std::fill(acc.begin(), acc.end(), 0.f);
          float* ap = acc.data();
          const int64_t OHW = p.OH * p.OW;
          for (int64_t k = 0; k < OHW; ++k) {
            const int64_t i = ipp[k];
            if (static_cast<uint64_t>(i) >= static_cast<uint64_t>(HW)) {
              bad.record(i);
              continue;
            }
            ap[i] += static_cast<float>(gp[k]);
          }
          if constexpr (std::is_same_v<scalar_t, at::BFloat16>)
            vec::float_to_bf16(ap, reinterpret_cast<uint16_t*>(xp), HW);
          else
            for (int64_t i = 0; i < HW; ++i) xp[i] = static_cast<scalar_t>(ap[i]);
          continue;
        }
        if (flat) {  // dense planes, every window with a tap: one flat loop
          const int64_t OHW = p.OH * p.OW;
          for (int64_t k = 0; k < OHW; ++k) {
            const int64_t i = ipp[k];
            if (static_cast<uint64_t>(i) >= static_cast<uint64_t>(HW)) {
              bad.record(i);
              continue;
            }
            xp[i] += gp[k];
          }
          continue;
        }
        for (int64_t oh = 0; oh < p.OH; ++oh) {
          if (empty.row_empty[oh]) continue;
          for (int64_t ow = 0; ow < p.OW; ++ow) {
            if (empty.col_empty[ow]) continue;
            const int64_t i = ipp[oh * is.h + ow * is.w];
            if (i < 0 || i >= HW) {
              bad.record(i);
              continue;
            }
            xp[i * xs.w] += gp[oh * gs.h + ow * gs.w];
          }
        }
      }
    });
  });
  bad.check("max_pool2d_with_indices_backward", p.H, p.W);
  return gx;
}

// out (N, C, h, w) = src (N, C, Hs, Ws) at indices (N, C, h, w); with `pool`, zero for
// the windows without a tap inside the input.
at::Tensor max_pool2d_gather(const char* op, const at::Tensor& src, const at::Tensor& indices,
                             const Pool2dParams* pool, at::MemoryFormat out_format) {
  at::Tensor out = at::empty(indices.sizes(), src.options().memory_format(out_format));
  if (out.numel() == 0) return out;
  const int64_t N = indices.size(0), C = indices.size(1), h = indices.size(2), w = indices.size(3);
  const int64_t Hs = src.size(2), Ws = src.size(3), HWs = Hs * Ws;
  // An empty source plane (max_unpool2d to an empty output, which checks no index
  // either) gives zeros.
  if (HWs == 0) return out.zero_();
  std::vector<char> row_ok(h, 1), col_ok(w, 1);
  if (pool != nullptr) {
    const EmptyWindows empty(*pool);
    for (int64_t o = 0; o < h; ++o) row_ok[o] = !empty.row_empty[o];
    for (int64_t o = 0; o < w; ++o) col_ok[o] = !empty.col_empty[o];
  }
  BadIndex bad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "cnnext_max_pool2d_gather", [&] {
    const scalar_t* sp = src.const_data_ptr<scalar_t>();
    const int64_t* ip = indices.const_data_ptr<int64_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    const Strides4 ss = strides_of(src), is = strides_of(indices), os = strides_of(out);
    if (os.c == 1 && C > 1) {
      kGatherCl.hit();
      // channels_last output: one output row (n, oh) per item, channels innermost.
      at::parallel_for(0, N * h, 1, [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const int64_t n = item / h, oh = item % h;
          const scalar_t* spp = sp + n * ss.n;
          const int64_t* ipp = ip + n * is.n + oh * is.h;
          scalar_t* opp = op_ + n * os.n + oh * os.h;
          for (int64_t ow = 0; ow < w; ++ow) {
            const bool ok = row_ok[oh] && col_ok[ow];
            for (int64_t c = 0; c < C; ++c) {
              scalar_t v = scalar_t(0);
              if (ok) {
                const int64_t i = ipp[ow * is.w + c * is.c];
                if (i < 0 || i >= HWs)
                  bad.record(i);
                else
                  v = spp[c * ss.c + flat_offset(ss, Ws, i)];
              }
              opp[ow * os.w + c] = v;
            }
          }
        }
      });
      return;
    }
    kGatherPlanes.hit();
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / C, c = plane % C;
        const scalar_t* spp = sp + n * ss.n + c * ss.c;
        const int64_t* ipp = ip + n * is.n + c * is.c;
        scalar_t* opp = op_ + n * os.n + c * os.c;
        for (int64_t oh = 0; oh < h; ++oh)
          for (int64_t ow = 0; ow < w; ++ow) {
            scalar_t v = scalar_t(0);
            if (row_ok[oh] && col_ok[ow]) {
              const int64_t i = ipp[oh * is.h + ow * is.w];
              if (i < 0 || i >= HWs)
                bad.record(i);
              else
                v = spp[flat_offset(ss, Ws, i)];
            }
            opp[oh * os.h + ow * os.w] = v;
          }
      }
    });
  });
  bad.check(op, Hs, Ws);
  return out;
}

at::Tensor max_pool2d_select(const at::Tensor& src, const at::Tensor& indices,
                             const Pool2dParams& p, at::MemoryFormat out_format) {
  return max_pool2d_gather("max_pool2d_select", src, indices, &p, out_format);
}

}  // namespace cpu
}  // namespace cnnext
