"""fastjac.ops._scoped.ScopedSetting: a ContextVar whose unset state torch.compile can trace (torch 2.11's dynamo
cannot trace ContextVar.get)."""
import threading

import torch

from fastjac.ops._scoped import ScopedSetting


def test_set_get_reset_nest_like_a_context_var():
    s = ScopedSetting("t")
    assert s.get() is None
    outer = s.set("a")
    assert s.get() == "a"
    inner = s.set("b")
    assert s.get() == "b"
    s.reset(inner)
    assert s.get() == "a"
    s.reset(outer)
    assert s.get() is None and s._holders == 0


def test_another_thread_sees_only_its_own_value():
    s = ScopedSetting("t")
    token = s.set("main")
    seen = []
    t = threading.Thread(target=lambda: seen.append(s.get()))
    t.start()
    t.join()
    assert seen == [None] and s.get() == "main"
    s.reset(token)


def test_compiled_code_reads_the_unset_value_in_one_graph():
    s = ScopedSetting("t")

    def f(x):
        return x + 1 if s.get() is None else x - 1

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    assert torch.equal(compiled(torch.zeros(2)), torch.ones(2))
