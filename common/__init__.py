"""What every stage builds on, and nothing stage-specific: errors, atomic writers, run folders and the
metrics log, distributed set-up and collectives, config location and composition, the stage scaffolding,
the ResNet builder, the checkpoint format and reader, the robust ImageFolder, the embedded datasets.

Imported by ``pretrain``, ``transfer``, ``slurm``, ``toylab``, ``benchmarks`` and ``tools``; imports none of
them (tests/project/test_import_graph.py reads the import graph and fails otherwise).
"""
