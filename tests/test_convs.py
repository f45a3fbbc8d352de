"""Stride-2 conv layer with a sub-pixel input gradient: same function, gradients and variables as Keras."""

import glob
import re
import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import precision

from dreamerv2_tf.algo import convs, nets


def random(shape, seed: int) -> tf.Tensor:
    return tf.random.stateless_normal(shape, seed=[seed, 7])


def pair(size: int, channels: int, filters: int, kernel: int, subpixel_grad=None, seed: int = 0):
    """A Keras Conv2D and a StridedConv built on [size, size + 1] images, with identical random weights."""
    shape = (2, size, size + 1, channels)
    ref = keras.layers.Conv2D(filters, kernel, 2)
    mine = convs.StridedConv(filters, kernel, subpixel_grad=subpixel_grad)
    ref.build(shape)
    mine.build(shape)
    mine.kernel.assign(random(mine.kernel.shape, seed))
    mine.bias.assign(random(mine.bias.shape, seed + 1))
    ref.kernel.assign(mine.kernel)
    ref.bias.assign(mine.bias)
    return ref, mine, random(shape, seed + 2)


def value_and_grads(layer, x):
    """Output and gradients w.r.t. input, kernel and bias of a non-linear loss, in a tf.function."""

    @tf.function
    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(tf.sin(tf.cast(y, tf.float32)) * tf.range(1.0, 1.0 + y.shape[-1]))
        return y, tape.gradient(loss, [x, layer.kernel, layer.bias])

    return run(x)


@pytest.mark.parametrize("kernel", [4, 5, 6])
@pytest.mark.parametrize("size", [9, 10])
@pytest.mark.parametrize("subpixel_grad", [True, False])
def test_strided_conv_matches_keras_conv2d(kernel, size, subpixel_grad):
    ref, mine, x = pair(size, 3, 5, kernel, subpixel_grad, seed=kernel + size)
    want_y, want_grads = value_and_grads(ref, x)
    got_y, got_grads = value_and_grads(mine, x)
    assert got_y.shape == want_y.shape == (2, (size - kernel) // 2 + 1, (size + 1 - kernel) // 2 + 1, 5)
    np.testing.assert_allclose(got_y.numpy(), want_y.numpy(), rtol=1e-5, atol=1e-5)
    for name, got, want in zip(("input", "kernel", "bias"), got_grads, want_grads, strict=True):
        assert np.abs(want.numpy()).max() > 1e-2, name  # the loss reaches every part
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("kernel", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("size", [3, 4, 7])
def test_subpixel_transposed_conv_matches_tensorflow(kernel, size):
    x = random((2, size, size + 2, 4), kernel)
    weights = random((kernel, kernel, 3, 4), size)  # [k, k, out, in]
    out = (2, (size - 1) * 2 + kernel, (size + 1) * 2 + kernel, 3)
    want = tf.nn.conv2d_transpose(x, weights, out, 2, "VALID")
    got = convs.conv2d_transpose_s2(x, weights)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    # A larger requested size pads zeros at the bottom/right (rows a strided conv never read).
    padded = convs.conv2d_transpose_s2(x, weights, (out[1] + 1, out[2] + 1))
    np.testing.assert_array_equal(padded[:, :-1, :-1].numpy(), got.numpy())
    assert np.all(padded[:, -1].numpy() == 0) and np.all(padded[:, :, -1].numpy() == 0)


def gradient_op_types(layer, x) -> set:
    @tf.function
    def grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x))
        return tape.gradient(loss, x)

    return {op.type for op in grad.get_concrete_function(x).graph.get_operations()}


def test_sub_pixel_input_gradient_only_for_small_outputs():
    assert convs.use_subpixel_grad((2, 2)) and convs.use_subpixel_grad((6, 6)) and convs.use_subpixel_grad((8, 8))
    assert not convs.use_subpixel_grad((14, 14)) and not convs.use_subpixel_grad((9, 8))
    small = convs.StridedConv(3, 4)  # 14x14 -> 6x6 outputs
    large = convs.StridedConv(3, 4)  # 32x32 -> 15x15 outputs
    small_ops = gradient_op_types(small, random((1, 14, 14, 2), 0))
    large_ops = gradient_op_types(large, random((1, 32, 32, 2), 0))
    assert "DepthToSpace" in small_ops and "Conv2DBackpropInput" not in small_ops
    assert "Conv2DBackpropInput" in large_ops and "DepthToSpace" not in large_ops


def executed_op_types(fn, x) -> set:
    """Types of the ops a tf.function actually ran (after TensorFlow pruned unused ones), from a profile."""
    xplane = pytest.importorskip("tensorflow.tsl.profiler.protobuf.xplane_pb2")
    fn(x)  # trace outside the profile
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        fn(x)
        tf.profiler.experimental.stop()
        space = xplane.XSpace()
        with open(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0], "rb") as file:
            space.ParseFromString(file.read())
    names = {plane.event_metadata[event.metadata_id].name.rpartition(":")[2]
             for plane in space.planes for line in plane.lines for event in line.events}
    # On CPUs where oneDNN rewrites ops (AVX-512 ones), Conv2DBackpropFilter runs as _MklNativeConv2DBackpropFilter.
    return {re.sub(r"^_Mkl(Native)?", "", name) for name in names}


def test_unneeded_input_gradient_is_not_computed():
    """The encoder's image needs no gradient: the sub-pixel input-gradient branch must not run."""
    layer = convs.StridedConv(4, 4, subpixel_grad=True)
    image = random((2, 10, 10, 3), 3)

    def grads(watch: bool):
        @tf.function
        def run(x):
            with tf.GradientTape() as tape:
                if watch:
                    tape.watch(x)
                loss = tf.reduce_sum(layer(x) ** 2)
            return tape.gradient(loss, [layer.kernel, *([x] if watch else [])])

        return run

    assert "DepthToSpace" in executed_op_types(grads(True), image)
    kernel_only = executed_op_types(grads(False), image)
    assert "Conv2DBackpropFilter" in kernel_only and "DepthToSpace" not in kernel_only


def test_variables_match_keras_conv2d():
    ref, mine, _ = pair(12, 3, 8, 4)
    assert [(v.name, tuple(v.shape)) for v in mine.trainable_variables] == \
           [(v.name, tuple(v.shape)) for v in ref.trainable_variables] == [("kernel", (4, 4, 3, 8)), ("bias", (8,))]
    fresh = convs.StridedConv(64, 4)
    fresh.build((1, 16, 16, 32))
    limit = np.sqrt(6 / (16 * 32 + 16 * 64))  # Glorot uniform, as Keras initialises Conv2D kernels
    kernel = fresh.kernel.numpy()
    assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.9 * limit
    assert np.all(fresh.bias.numpy() == 0)
    assert fresh.compute_output_shape((None, 16, 15, 32)) == (None, 7, 6, 64)


def test_mixed_float16_outputs_and_gradients():
    with precision("16"):
        layer = convs.StridedConv(6, 4)
        x = random((2, 14, 14, 3), 1)
        y, grads = value_and_grads(layer, x)
    assert layer.kernel.dtype == "float32"
    assert y.dtype == tf.float16 and np.isfinite(y.numpy()).all()
    assert all(np.isfinite(g.numpy()).all() for g in grads)
    assert np.abs(grads[1].numpy()).max() > 0


def test_encoder_equals_a_stack_of_keras_conv2d():
    keras.utils.set_random_seed(0)
    encoder = nets.Encoder({"image": (64, 64, 1)}, cnn_keys="image", mlp_keys="$^", cnn_depth=2)
    image = tf.random.stateless_uniform((2, 3, 64, 64, 1), [1, 2], 0, 255)
    embed = encoder({"image": image})
    x = tf.reshape(image, (6, 64, 64, 1))
    for i, layer in enumerate(encoder._convs):
        assert isinstance(layer, convs.StridedConv)
        ref = keras.layers.Conv2D(2 * 2**i, 4, 2, activation="elu")
        ref.build(x.shape)
        ref.set_weights(layer.get_weights())
        x = ref(x)
    assert x.shape == (6, 2, 2, 16)
    np.testing.assert_allclose(embed.numpy(), tf.reshape(x, (2, 3, 64)).numpy(), rtol=1e-4, atol=1e-4)


def test_bad_sizes_are_clear_errors():
    with pytest.raises(ValueError, match="kernel of 4x4 does not fit an input of 3x5"):
        convs.conv2d_s2(tf.zeros((1, 3, 5, 1)), tf.zeros((4, 4, 1, 2)))
    with pytest.raises(ValueError, match="filters and kernel_size must be positive"):
        convs.StridedConv(0, 4)
