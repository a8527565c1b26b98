"""The paper's ablations as notebooks (jupytext percent-format sources, executed by `execute`)."""
