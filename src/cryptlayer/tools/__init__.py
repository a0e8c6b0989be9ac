"""One thin module per external tool: typed functions, no business logic."""
