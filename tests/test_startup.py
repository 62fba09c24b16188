"""What makes the scripts start and finish sooner, checked against independent references: decoding
drained ahead in a thread, batch norms folded into convolutions at export, the blur matrix built
without SciPy, networks built without random draws when their weights are loaded, and the crops
kept by the scoring for the figures."""
import threading
import time

import numpy as np
import pytest

from utils.prefetch import Prefetched


def test_prefetched_keeps_order_and_works_ahead():
    produced = []

    def items():
        for i in range(6):
            produced.append(i)
            yield i

    ahead = Prefetched(items(), depth=2)
    deadline = time.monotonic() + 10
    while len(produced) < 3 and time.monotonic() < deadline:    # 2 queued + 1 waiting to be put
        time.sleep(0.01)
    assert produced == [0, 1, 2]                                # started before anyone asked
    assert list(ahead) == list(range(6))
    assert list(ahead) == []


def test_prefetched_raises_the_error_where_it_happened():
    def items():
        yield "a"
        raise KeyError("broken image")

    ahead = Prefetched(items())
    assert next(ahead) == "a"
    with pytest.raises(KeyError, match="broken image"):
        next(ahead)
    with pytest.raises(StopIteration):
        next(ahead)


def test_prefetched_close_stops_the_thread_and_closes_the_generator():
    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    with Prefetched(endless(), depth=1) as ahead:
        assert next(ahead) == 0
    assert closed.wait(10)
    assert not ahead._thread.is_alive()


def _net_with_batch_norms():
    import paddle
    from paddle import nn

    class Block(nn.Layer):                                      # ResNet's naming: convN feeds bnN
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2D(4, 6, 3, padding=1, bias_attr=False)
            self.bn1 = nn.BatchNorm2D(6)
            self.conv2 = nn.Conv2D(6, 6, 3, stride=2, padding=1, groups=3)     # with a bias of its own
            self.bn2 = nn.BatchNorm2D(6)

        def forward(self, x):
            return self.bn2(self.conv2(paddle.nn.functional.relu(self.bn1(self.conv1(x)))))

    paddle.seed(3)
    net = nn.Sequential(nn.Conv2D(3, 4, 1), nn.BatchNorm2D(4), nn.ReLU(), Block())
    rng = np.random.default_rng(0)
    for layer in net.sublayers():
        if isinstance(layer, nn.BatchNorm2D):
            n = layer._mean.shape[0]
            layer._mean.set_value(rng.normal(size=n).astype(np.float32))
            layer._variance.set_value(rng.uniform(0.2, 3.0, n).astype(np.float32))
            layer.weight.set_value(rng.normal(size=n).astype(np.float32))
            layer.bias.set_value(rng.normal(size=n).astype(np.float32))
    net.eval()
    return net


def test_folding_batch_norms_keeps_the_outputs():
    import paddle
    from paddle import nn

    from models.export import fold_batch_norms
    net = _net_with_batch_norms()
    x = paddle.to_tensor(np.random.default_rng(1).normal(size=(2, 3, 9, 11)).astype(np.float32))
    with paddle.no_grad():
        expected = net(x).numpy()                               # Paddle's own batch norm
        assert fold_batch_norms(net) == 3
        got = net(x).numpy()
    assert not any(isinstance(layer, nn.BatchNorm2D) for layer in net.sublayers())
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("size, sigma", [(224, 4.0), (56, 4.0), (5, 4.0), (1, 4.0), (37, 1.5)])
def test_blur_matrix_is_scipys_gaussian_filter(size, sigma):
    from scipy.ndimage import gaussian_filter1d

    from models.padim import blur_matrix
    columns = np.random.default_rng(size).normal(size=(size, 3))
    expected = gaussian_filter1d(columns, sigma, axis=0, mode="reflect", truncate=4.0)
    np.testing.assert_allclose(blur_matrix(size, sigma) @ columns, expected, rtol=1e-12, atol=1e-12)


def test_network_built_for_loaded_weights_draws_no_random_numbers():
    import paddle

    from models.backbones import build_backbone
    placeholder = build_backbone("mobilenet_v2", None)
    assert placeholder.weights_source == "unset"
    assert all(not np.any(p.numpy()) for p in placeholder.parameters() if p.stop_gradient is False)
    paddle.seed(5)
    first = paddle.nn.Linear(4, 4).weight.numpy()
    paddle.seed(5)
    random = build_backbone("mobilenet_v2", "random")
    assert any(np.any(p.numpy()) for p in random.parameters())
    paddle.seed(5)
    assert np.array_equal(paddle.nn.Linear(4, 4).weight.numpy(), first)   # the global initialiser is Paddle's again


def test_kept_crops_are_the_decoded_ones(demo_root, monkeypatch):
    """score_dataset(keep_images=True) gives the figures the crops the batches were normalised
    from, equal to decoding each image again."""
    import models.pipeline as pipeline
    from datasets.mvtec import MVTecDataset, read_rgb

    def zeros(model, static_graph=True):
        return lambda images: (np.zeros((len(images), 224, 224), np.float32), np.zeros(len(images), np.float32))

    monkeypatch.setattr(pipeline, "model_scorer", zeros)
    dataset = MVTecDataset(demo_root, "demo", "test", 256, 224)
    dataset.samples = dataset.samples[:5]
    scored = pipeline.score_dataset(None, dataset, batch_size=2, num_workers=1, progress=False, keep_images=True)
    assert scored.images.dtype == np.uint8 and scored.images.shape == (5, 224, 224, 3)
    for image, sample in zip(scored.images, scored.samples):
        np.testing.assert_array_equal(image, dataset.transform.to_display(read_rgb(sample.path)))
