"""The CPU's Paddle Inference path (models/static.py) against eager Paddle on the same model:
the fit and the scores must agree to float32 noise, so --static_graph only changes speed."""
import copy

import numpy as np
import paddle

from datasets.mvtec import MVTecDataset
from models.pipeline import build_model, fit_padim, model_scorer, score_dataset
from models.static import StaticRunner


def test_static_runner_equals_eager_layer():
    paddle.seed(3)
    layer = paddle.nn.Sequential(paddle.nn.Conv2D(3, 4, 3, padding=1), paddle.nn.ReLU())
    layer.eval()
    images = np.random.default_rng(0).normal(size=(3, 3, 8, 8)).astype(np.float32)
    runner = StaticRunner([layer], layer, (8, 8))
    with paddle.no_grad():
        expected = layer(paddle.to_tensor(images)).numpy()
    (ours,) = runner(images)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)
    # the eager layer is untouched by the tracing and the batch size is free
    assert isinstance(layer(paddle.to_tensor(images[:1])), paddle.Tensor)
    assert runner(images[:2])[0].shape == (2, 4, 8, 8)


def test_fit_and_scores_match_between_static_graph_and_eager(demo_root):
    train = MVTecDataset(demo_root, "demo", "train", 72, 64)
    train.samples = train.samples[:12]
    fitted = {static: fit_padim(train, "mobilenet_v2", "imagenet", d=20, batch_size=5, num_workers=1,
                                progress=False, print_freq=0, static_graph=static)[0]
              for static in (True, False)}
    for name in ("mean", "whitening"):
        static, eager = fitted[True].arrays[name], fitted[False].arrays[name]
        assert np.abs(static - eager).max() <= 1e-3 * np.abs(eager).max(), name

    test = MVTecDataset(demo_root, "demo", "test", 72, 64)
    test.samples = test.samples[:6]
    scored = {}
    for static in (True, False):
        model = build_model(copy.deepcopy(fitted[False]))   # the model takes over (permutes) the arrays
        scored[static] = score_dataset(model, test, batch_size=4, num_workers=1, progress=False,
                                       static_graph=static)
    np.testing.assert_allclose(scored[True].maps, scored[False].maps, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(scored[True].scores, scored[False].scores, rtol=1e-4)


def test_large_gaussians_stay_eager(monkeypatch):
    """Above STATIC_SCORING_MAX_BYTES the Gaussian would be copied into the graph: eager instead."""
    import models.pipeline as pipeline

    class Model:
        whitening = np.zeros((10, 4, 4), dtype=np.float32)
        image_size = (8, 8)

        def __call__(self, images):
            return paddle.zeros([len(images), 8, 8]), paddle.zeros([len(images)])

    monkeypatch.setattr(pipeline, "STATIC_SCORING_MAX_BYTES", 100)
    monkeypatch.setattr(pipeline, "static_runner_or_none", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    maps, scores = model_scorer(Model(), static_graph=True)(np.zeros((2, 3, 8, 8), np.float32))
    assert maps.shape == (2, 8, 8) and scores.shape == (2,)
