"""The engine: a run's settings (`config`), the protection methods (`methods`), the PGD attack (`attack`), robust
and shaping options, the pipeline that protects images in memory (`pipeline`), the losses' shared pieces
(`objectives`), fine-tuning (`finetune`), compiling and CPU tuning. It knows nothing of files, jobs or faces; it
imports only models and common modules."""
