"""Pure tensor math: the circulant product and fits, the C++ decode kernel, input statistics, cost formulas."""
