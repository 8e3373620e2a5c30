"""Direct timing of BatchNorm vs BatchNorm+ReLU forward + backward + double backward (median of 7), one process:
``PYTHONPATH=<checkout> python -m benchmarks.time_bn_ops``. Used to compare two builds of fastjac._C side by side
(benchmarks/RESULTS.md, stop 8); the full comparison against PyTorch is ``python -m benchmarks.report``."""
import time, torch, fastjac
torch.manual_seed(0)
for shape in [(128, 64, 32, 32), (128, 256, 8, 8)]:
    C = shape[1]
    x = torch.randn(*shape, requires_grad=True); w = torch.rand(C, requires_grad=True) + 0.5; b = torch.randn(C, requires_grad=True)
    rm, rv = torch.zeros(C), torch.ones(C)
    v = torch.randn(*shape, requires_grad=True); u = torch.randn(*shape)
    def step(relu):
        op = fastjac.ops.batch_norm_relu if relu else fastjac.ops.batch_norm
        y = op(x, rm, rv, w, b, training=True)
        (gx,) = torch.autograd.grad(y, x, v, create_graph=True)
        torch.autograd.grad(gx, [x, v, w], u)
    for relu in (False, True):
        for _ in range(2): step(relu)
        ts = []
        for _ in range(7):
            t = time.perf_counter(); step(relu); ts.append(time.perf_counter() - t)
        ts.sort(); print(fastjac.__file__, shape, "bnrelu" if relu else "bn", f"{1e3*ts[3]:.1f} ms")
