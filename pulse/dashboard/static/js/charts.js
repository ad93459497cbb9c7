// Small time-series charts (uPlot, vendored as a static file) with rule thresholds.

const HEIGHT = 56;
const LINE = "#2dd4bf";
const FILL = "rgba(45, 212, 191, 0.10)";
const THRESHOLD = "rgba(248, 81, 73, 0.75)";

function paddedRange(_plot, min, max) {
  if (min === null || max === null) return [0, 1];
  const pad = Math.max(0.5, (max - min) * 0.15);
  return [min - pad, max + pad];
}

export class Sparkline {
  constructor(element) {
    this.element = element;
    this.thresholds = [];
    const options = {
      width: Math.max(120, element.clientWidth || 200),
      height: HEIGHT,
      pxAlign: false,
      legend: { show: false },
      cursor: { show: false },
      select: { show: false },
      scales: { x: { time: true }, y: { range: paddedRange } },
      axes: [{ show: false }, { show: false }],
      series: [{}, { stroke: LINE, width: 1.5, fill: FILL, points: { show: false } }],
      hooks: { draw: [(plot) => this.drawThresholds(plot)] },
    };
    this.plot = new window.uPlot(options, [[], []], element);
  }

  setData(times, values, thresholds) {
    this.thresholds = thresholds;
    this.plot.setData([times, values]);
  }

  resize() {
    const width = Math.max(120, this.element.clientWidth);
    if (width !== this.plot.width) this.plot.setSize({ width, height: HEIGHT });
  }

  drawThresholds(plot) {
    const { ctx, bbox } = plot;
    for (const value of this.thresholds) {
      const y = plot.valToPos(value, "y", true);
      if (!(y >= bbox.top && y <= bbox.top + bbox.height)) continue;
      ctx.save();
      ctx.strokeStyle = THRESHOLD;
      ctx.lineWidth = 1;
      ctx.setLineDash([4, 3]);
      ctx.beginPath();
      ctx.moveTo(bbox.left, y);
      ctx.lineTo(bbox.left + bbox.width, y);
      ctx.stroke();
      ctx.restore();
    }
  }
}
