"""Stride-2 convolution whose input gradient avoids a slow TensorFlow CPU kernel for small outputs.

The input gradient of a strided conv is a transposed conv, which TensorFlow computes with
Conv2DBackpropInput. On CPUs that kernel is slow when each image has only a few output pixels: measured on
a 2-core AVX2 CPU for 400 images, the input gradient of the encoder's last conv (6x6x192 -> 2x2x384,
kernel 4) takes 11x as long as the sub-pixel form below, that of a conv with 6x6 outputs 1.4x; with 14x14
outputs and larger the native kernel is the faster one. On a 2-core AVX-512 Xeon the native kernel is not
slow: there the whole `atari` update took the same time either way, within 3%. `StridedConv` keeps the native
forward conv and kernel gradient and, for small outputs, computes the input gradient as a sub-pixel
convolution (`conv2d_transpose_s2`): one forward stride-1 conv producing the four output phases, then
depth_to_space(2). Computing the forward pass or the kernel gradient this way, or the decoder's transposed
convs, measured no faster than TensorFlow's own kernels.
"""

from __future__ import annotations

import keras
import tensorflow as tf

# Largest number of output pixels per image for which the sub-pixel input gradient is used (see above).
SUBPIXEL_MAX_PIXELS = 64


def conv_out_size(size: int, kernel: int) -> int:
    """Output side of a 'valid' stride-2 convolution."""
    return (int(size) - int(kernel)) // 2 + 1


def deconv_out_size(size: int, kernel: int) -> int:
    """Output side of a 'valid' stride-2 transposed convolution."""
    return (int(size) - 1) * 2 + int(kernel)


def subpixel_kernel(kernel: tf.Tensor) -> tf.Tensor:
    """[k, k, O, C] kernel of a stride-2 transposed conv -> [K, K, C, 4 O] stride-1 kernel, K = ceil(k / 2).

    Output pixel (2m + r, 2n + c) of the transposed conv is the sum over j, l of
    x[m - j, n - l] @ kernel[2j + r, 2l + c]. With the input padded by K - 1 on each side this is a stride-1
    correlation with new[K - 1 - j, K - 1 - l, :, (2r + c) O + o] = kernel[2j + r, 2l + c, o, :] (zero
    where 2j + r or 2l + c >= k), laid out for tf.nn.depth_to_space(2).
    """
    kh, kw = kernel.shape[0], kernel.shape[1]
    if kh % 2 or kw % 2:
        kernel = tf.pad(kernel, [[0, kh % 2], [0, kw % 2], [0, 0], [0, 0]])
    half_h, half_w, cout, cin = (kh + 1) // 2, (kw + 1) // 2, kernel.shape[2], kernel.shape[3]
    k = tf.reshape(kernel, [half_h, 2, half_w, 2, cout, cin])  # [j, r, l, c, o, i]
    k = tf.reverse(k, [0, 2])  # j -> K - 1 - j
    k = tf.transpose(k, [0, 2, 5, 1, 3, 4])  # [t, u, i, r, c, o]
    return tf.reshape(k, [half_h, half_w, cin, 4 * cout])


def conv2d_transpose_s2(x: tf.Tensor, kernel: tf.Tensor, out_hw: tuple[int, int] | None = None) -> tf.Tensor:
    """'VALID' stride-2 transposed conv of NHWC `x` with a [k, k, out, in] kernel, as a sub-pixel conv.

    Equals tf.nn.conv2d_transpose(x, kernel, [N, *out_hw, out], 2, 'VALID'): the natural output size
    (H - 1) * 2 + k, cropped or zero-padded at the bottom/right to `out_hw` (the input size of a strided
    conv whose last rows were never read).
    """
    kh, kw = kernel.shape[0], kernel.shape[1]
    height, width = x.shape[1], x.shape[2]
    pad_h, pad_w = (kh + 1) // 2 - 1, (kw + 1) // 2 - 1
    x = tf.pad(x, [[0, 0], [pad_h, pad_h], [pad_w, pad_w], [0, 0]])
    y = tf.nn.depth_to_space(tf.nn.conv2d(x, subpixel_kernel(kernel), 1, "VALID"), 2)
    out_h, out_w = out_hw or (deconv_out_size(height, kh), deconv_out_size(width, kw))
    y = y[:, :out_h, :out_w]  # odd kernels leave one extra row/column
    extra_h, extra_w = out_h - y.shape[1], out_w - y.shape[2]
    if extra_h > 0 or extra_w > 0:
        y = tf.pad(y, [[0, 0], [0, max(0, extra_h)], [0, max(0, extra_w)], [0, 0]])
    return y


def use_subpixel_grad(out_hw: tuple[int, int]) -> bool:
    """Whether the sub-pixel input gradient is faster than Conv2DBackpropInput for this output size.

    Measured on CPUs only, so with a GPU visible the native kernel is kept.
    """
    return out_hw[0] * out_hw[1] <= SUBPIXEL_MAX_PIXELS and not tf.config.list_logical_devices("GPU")


def conv2d_s2(x: tf.Tensor, kernel: tf.Tensor, subpixel_grad: bool | None = None) -> tf.Tensor:
    """tf.nn.conv2d(x, kernel, 2, 'VALID') for NHWC `x` with static height and width.

    `subpixel_grad` picks the input gradient: a sub-pixel conv (True), TensorFlow's Conv2DBackpropInput
    (False) or by output size (None). The kernel gradient is TensorFlow's either way.
    """
    kh, kw = kernel.shape[0], kernel.shape[1]
    height, width = x.shape[1], x.shape[2]
    if height is None or width is None:
        raise ValueError(f"conv2d_s2 needs a static image size, got input shape {x.shape}")
    out_hw = conv_out_size(height, kh), conv_out_size(width, kw)
    if min(out_hw) < 1:
        raise ValueError(f"a kernel of {kh}x{kw} does not fit an input of {height}x{width}")
    if subpixel_grad is None:
        subpixel_grad = use_subpixel_grad(out_hw)
    if not subpixel_grad:
        return tf.nn.conv2d(x, kernel, 2, "VALID")

    @tf.custom_gradient
    def conv(x: tf.Tensor, kernel: tf.Tensor):
        def grad(dy: tf.Tensor):
            with tf.name_scope("conv2d_s2_grad"):
                # When nothing needs the input gradient (the encoder's image) TensorFlow prunes this branch.
                dx = conv2d_transpose_s2(dy, kernel, (height, width))
                dkernel = tf.raw_ops.Conv2DBackpropFilter(
                    input=x, filter_sizes=tf.shape(kernel), out_backprop=dy, strides=[1, 2, 2, 1], padding="VALID")
            return dx, dkernel

        return tf.nn.conv2d(x, kernel, 2, "VALID"), grad

    return conv(x, kernel)


class StridedConv(keras.layers.Layer):
    """keras.layers.Conv2D(filters, kernel_size, strides=2) with 'valid' padding on NHWC images.

    Same variables (`kernel` [k, k, in, filters] with Glorot-uniform init, `bias` zeros), outputs and
    gradients; only the input gradient of small outputs is computed differently (see `conv2d_s2`).
    """

    def __init__(self, filters: int, kernel_size: int, subpixel_grad: bool | None = None, **kwargs):
        super().__init__(**kwargs)
        if int(filters) < 1 or int(kernel_size) < 1:
            raise ValueError(f"filters and kernel_size must be positive, got {filters} and {kernel_size}")
        self.filters, self.kernel_size, self.subpixel_grad = int(filters), int(kernel_size), subpixel_grad

    def build(self, input_shape) -> None:
        shape = (self.kernel_size, self.kernel_size, int(input_shape[-1]), self.filters)
        self.kernel = self.add_weight(name="kernel", shape=shape, initializer="glorot_uniform")
        self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer="zeros")
        self.built = True

    def call(self, x: tf.Tensor) -> tf.Tensor:
        kernel = tf.cast(self.kernel, self.compute_dtype)
        y = conv2d_s2(x, kernel, self.subpixel_grad)
        return tf.nn.bias_add(y, tf.cast(self.bias, self.compute_dtype))

    def compute_output_shape(self, input_shape):
        size = lambda s: None if s is None else conv_out_size(s, self.kernel_size)  # noqa: E731
        return (input_shape[0], size(input_shape[1]), size(input_shape[2]), self.filters)

    def get_config(self) -> dict:
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
                "subpixel_grad": self.subpixel_grad}
