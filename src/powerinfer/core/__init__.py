"""Plain shared types at the bottom of the layer list (DESIGN, "Layers"): a weight in its GGUF block format
(`QTensor`, `row_bytes`), the architecture (`ModelConfig`) and the weights by role (`ModelWeights`). Every other
package reads them; they import nothing of the project."""
