"""Autograd formulas of the convolution ops. They are implemented in C++
(csrc/ops/autograd_conv2d.cpp: torch::autograd::Functions registered for the ops'
Autograd dispatch key, so torch.ops.cnnext.conv2d is differentiable wherever it is
called); this module states the algebra.

The conv2d ops are closed under differentiation, so gradients of any order are
cnnext kernels too. With A_w the linear map x -> conv2d(x, w):
  conv2d(x, w)                     = A_w x          d/dx: A_w^T g            d/dw: weight_backward(g, x)
  conv2d_input_backward(g, w)      = A_w^T g        d/dg: A_w dz             d/dw: weight_backward(g, dz)
  conv2d_weight_backward(g, x)     = dW <g, A_W x>  d/dg: A_dW x             d/dx: A_dW^T g
  conv_transpose2d(x, w)           = A_w^T x        d/dx: A_w g              d/dw: weight_backward(x, g)
(the last because <A_w^T x, g> = <x, A_w g>: x plays conv2d's grad_output, g its input).
Each formula saves only the tensors its backward reads.

The C++ kernels replaced torch.library.register_autograd formulas written here in
Python: the Python autograd.Function that register_autograd builds cost ~10 us per
forward and more per backward, more than a small layer's kernel.
"""
