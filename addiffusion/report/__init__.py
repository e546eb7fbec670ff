"""Reports built from the pipeline's outputs: ``addiffusion report ablations`` turns
``dvc exp show --json`` into a markdown table and a plot (:mod:`addiffusion.report.ablations`)."""
