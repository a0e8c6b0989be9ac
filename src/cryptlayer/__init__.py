"""cryptlayer: containers from LUKS2-encrypted layer images."""
