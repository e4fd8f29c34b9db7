"""Generated v1 API. Do not edit: change the .proto files and run `make proto`."""
