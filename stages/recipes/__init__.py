"""One module per training stage: what it trains and on what, built from its config and inputs.

Each module gives
- `build(cfg, args, accelerator)`: the stage's training.run.Recipe (network, EMA, optimizer section,
  data, loss, identity, model description, snapshots), which training.run.run trains;
- the pieces bench/ times on networks at full size with random weights and no input files: the
  network from a description (`network`, `student`), the loss of one batch (`objective`), and a
  batch of random values of the shapes the stage's data gives (stages/recipes/examples.py).
The stage scripts (stages/<rule>.py) read: arguments, recipe, run.
"""
