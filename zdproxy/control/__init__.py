"""The control plane: the runtime (sole mutation API over routing state), the
audit log of its changes, and the store that makes its state survive restarts."""
