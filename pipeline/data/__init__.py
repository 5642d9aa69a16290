"""The data: the synthetic federated long-tailed set, validation of any dataset, detectron2
registration, annotation files as dicts, the training loader, and the prepare stage."""
