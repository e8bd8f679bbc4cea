// ECharts, with only the parts the dashboard uses (keeps the bundle small).

import * as echarts from "echarts/core";
import { BarChart, LineChart } from "echarts/charts";
import {
  GridComponent,
  LegendComponent,
  TooltipComponent,
} from "echarts/components";
import { CanvasRenderer } from "echarts/renderers";

echarts.use([BarChart, LineChart, GridComponent, LegendComponent, TooltipComponent, CanvasRenderer]);

export type Chart = echarts.ECharts;

export function chart(el: HTMLElement): Chart {
  const c = echarts.init(el, undefined, { renderer: "canvas" });
  new ResizeObserver(() => c.resize()).observe(el);
  return c;
}

export const timeLabel = (ms: number): string =>
  new Date(ms).toISOString().slice(11, 19);
