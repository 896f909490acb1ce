"""The method: ODE solvers, trajectory generation, and the losses of every stage (EDM, CMT-CM, ECT,
CMT-MF, MeanFlow)."""
