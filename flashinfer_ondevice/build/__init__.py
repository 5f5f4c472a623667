"""Building flash stores: conversion from a checkpoint, sparsity calibration and the output
layer's proxy fit. The one package that may drive the runtime to write a store; nothing
imports it but the API and the CLI."""
