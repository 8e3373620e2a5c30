"""Whole experiments: a config's teacher, every cell of its sweep and then its evaluations, into one output
directory (:mod:`.runner`), and ``fastjac demo`` (:mod:`.demo`). Above :mod:`fastjac.evaluation` and
:mod:`fastjac.training`, below the CLI."""
