"""One thin module per external tool: typed functions, no business logic."""

# Every layer is made of 4 KiB blocks: ext4's block, the LUKS2 sector and dm-verity's data and
# hash blocks are one size (the page size), so a layer's blocks, sectors and hashes line up.
BLOCK = 4096
