"""The inference runtime: model options -> an encoder (ONNX Runtime or torch), with the ONNX
cache, the torch-free tokenizer and preprocessing. The networks themselves live in eclip.model;
this package builds on eclip.model (the torch engine, the export) and never the other way round."""
