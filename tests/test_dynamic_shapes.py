"""Shape polymorphism: one traced graph of PETR serves every input size (MODEL.PETR.COMPILE.DYNAMIC,
torch.export with dynamic H, W and batch), with the eager model's results."""

import pytest
import torch
from petr_testing import opera_tiny_cfg, shrink_cfg

from petr.data.preprocess import PETRImages, padding_mask
from petr.engine import PETRTrainer
from petr.layers import ms_deform_attn
from petr.modeling.compile import compile_model
from petr.utils.compat import HAS_CUSTOM_OP

# 12 distinct (h, w): COCO-like aspect ratios (4:3, 3:4, 16:9, 1:1, 3:2, 2:3), short side
# 160-320, long side <= 512. Batches of 2 pad images of different sizes, larger in either order.
BATCHES = [
    [(160, 213)], [(240, 320)], [(320, 427)], [(288, 512)], [(213, 160)], [(320, 240)],
    [(256, 256)], [(200, 300)], [(180, 320), (240, 180)], [(300, 200), (320, 320)],
]  # fmt: skip


def _tiny_model():
    """The smallest PETR that runs every inference stage (one layer per transformer part)."""
    cfg = shrink_cfg(opera_tiny_cfg())
    cfg.MODEL.PETR.POSE_DEC_LAYERS = cfg.MODEL.PETR.JOINT_DEC_LAYERS = 1
    torch.manual_seed(0)
    return cfg, PETRTrainer.build_model(cfg).eval()


def _inputs(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)}
            for h, w in sizes]  # fmt: skip


def test_padding_mask_from_a_size_tensor_equals_the_one_from_ints():
    batch = torch.zeros(3, 3, 20, 30)
    sizes = [(20, 30), (7, 30), (20, 1)]
    expected = padding_mask(batch, sizes)
    assert expected.sum().item() == 13 * 30 + 20 * 29
    assert torch.equal(padding_mask(batch, torch.tensor(sizes)), expected)


def test_joint_decoder_batched_path_equals_the_per_image_path():
    _, model = _tiny_model()
    batch, sizes = torch.randn(2, 3, 96, 128), [(96, 128), (80, 100)]
    images = PETRImages(batch, sizes, padding_mask(batch, sizes))
    with torch.no_grad():
        enc = model.encode(images)
        kpts = torch.rand(2 * 5, 2 * model.num_keypoints)
        batched = model.joint_decoder(enc, kpts)
        per_image = model.joint_decoder(enc, kpts, [5, 5])
    assert torch.equal(batched, per_image)


@pytest.mark.skipif(not HAS_CUSTOM_OP, reason="torch < 2.4 has no custom op to trace through")
def test_deform_attn_op_keeps_level_sizes_symbolic_under_export():
    """Level sizes derived from the input's shape stay symbolic through the op (and its fake
    implementation and input checks): one export serves other sizes with eager's results."""

    class Attend(torch.nn.Module):
        def forward(self, x, loc, attn):  # x (1, M * D, H, W); two levels, strides 1 and 2
            levels = [x, torch.nn.functional.avg_pool2d(x, 1, 2)]
            sizes = [(f.shape[2], f.shape[3]) for f in levels]
            value = torch.cat([f.flatten(2).transpose(1, 2) for f in levels], 1)  # (1, S, M * D)
            value = value.reshape(1, value.shape[1], 2, 4)
            return ms_deform_attn(value, sizes, [0, sizes[0][0] * sizes[0][1]], loc, attn)

    def inputs(h, w):
        g = torch.Generator().manual_seed(h * w)
        return (torch.rand(1, 8, h, w, generator=g), torch.rand(1, 5, 2, 2, 3, 2, generator=g),
                torch.rand(1, 5, 2, 2, 3, generator=g))  # fmt: skip

    dims = {2: torch.export.Dim("H", min=8, max=256), 3: torch.export.Dim("W", min=8, max=256)}
    ep = torch.export.export(
        Attend(), inputs(10, 14), dynamic_shapes={"x": dims, "loc": None, "attn": None}
    )
    for h, w in [(9, 31), (40, 12)]:
        torch.testing.assert_close(ep.module()(*inputs(h, w)), Attend()(*inputs(h, w)))


@pytest.mark.slow
@pytest.mark.skipif(
    not HAS_CUSTOM_OP, reason="torch < 2.4: the kernel breaks the graph; DYNAMIC is not honoured"
)
def test_dynamic_compile_serves_twelve_sizes_with_two_graphs():
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters

    cfg, model = _tiny_model()
    cfg.MODEL.PETR.COMPILE.ENABLED = True
    assert cfg.MODEL.PETR.COMPILE.DYNAMIC  # the default
    graphs = CompileCounter()  # counts the graphs dynamo compiles (and runs them as traced)
    compiled = compile_model(PETRTrainer.build_model(cfg).eval(), cfg, backend=graphs)
    compiled.load_state_dict(model.state_dict())
    torch._dynamo.reset()
    counters.clear()
    # At batch 1 PyTorch's CPU convolution picks oneDNN or its native kernel by the input's
    # element count (threshold 20480), and tracing guards that choice; this narrow model's
    # feature maps straddle the threshold (real models' do not), so the choice is fixed here.
    with torch.backends.mkldnn.flags(enabled=False), torch.no_grad():
        for i, sizes in enumerate(BATCHES):
            inputs = _inputs(sizes, seed=i)
            for got, want in zip(compiled(inputs), model(inputs)):
                got, want = got["instances"], want["instances"]
                torch.testing.assert_close(got.scores, want.scores)
                torch.testing.assert_close(got.pred_keypoints, want.pred_keypoints)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert graphs.frame_count <= 2  # one per batch size (the length of the input list)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUSTOM_OP, reason="torch < 2.4 has no custom op to export through")
def test_exported_predict_serves_every_size_and_batch():
    """torch.export of `predict` with dynamic batch, H and W: no level size is pinned."""
    _, model = _tiny_model()

    class Predict(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, image, image_sizes):
            images = PETRImages(image, image_sizes, padding_mask(image, image_sizes))
            p = self.model.predict(images)
            return p.scores, p.keypoints

    Dim = torch.export.Dim
    batch, h, w = Dim("B", min=1, max=4), Dim("H", min=65, max=640), Dim("W", min=65, max=640)
    example = (torch.randn(2, 3, 160, 224), torch.tensor([[160, 224], [150, 200]]))
    dynamic = {"image": {0: batch, 2: h, 3: w}, "image_sizes": {0: batch}}
    ep = torch.export.export(Predict(), example, dynamic_shapes=dynamic)
    for shape, sizes in [((1, 3, 200, 300), [[200, 300]]), ((3, 3, 320, 256), [[320, 256]] * 3),
                         ((2, 3, 240, 320), [[240, 320], [200, 160]])]:  # fmt: skip
        args = (torch.randn(shape), torch.tensor(sizes))
        with torch.no_grad():
            for got, want in zip(ep.module()(*args), Predict()(*args)):
                torch.testing.assert_close(got, want)
