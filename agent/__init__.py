"""spiffe-delegate: a node agent serving SPIRE-issued identities to a node-local proxy."""

import warnings

# py-spiffe names cryptography's DSA key types when it is imported; cryptography 51 and
# later warn about DSA on that access. The agent never uses DSA, and the warning would
# land on the first line of every command's stderr (before its one-line error).
warnings.filterwarnings("ignore", message="DSA is deprecated", module=r"spiffe\.")
