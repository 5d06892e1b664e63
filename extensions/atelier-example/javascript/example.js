// Example extension: marks the page so tests (and you) can see injected JavaScript ran.
window.atelierExampleLoaded = true;
